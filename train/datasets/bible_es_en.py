"""The tfds builder `bible_es_en`: Spanish (RV1909) → English (WEB) verses.

Registered under the name "bible_es_en" when `train.datasets` is imported, so
the rest of tfds works by name:

    import train.datasets, tensorflow_datasets as tfds
    test = tfds.data_source("bible_es_en", split="test")  # builds on first use
    test[0]  # {"es": b"...", "en": b"...", "ref": b"Gen 16:1"}

Features: `es`, `en` (UTF-8 text) and `ref` (the verse, "Gen 1:1", OSIS book
id). Splits: train / validation / test by chapter (see `bible_alignment`),
about 28.8k / 983 / 1,063 pairs, stored in canonical verse order (shuffling
disabled so evaluation order is the Bible's). The files are array_record by
default, so reading needs no TensorFlow; building takes a few seconds from the
Debian SWORD modules (no download; `SWORD_PATH` overrides /usr/share/sword).
"""

from __future__ import annotations

import tensorflow_datasets as tfds

from train.datasets import bible_alignment

_DESCRIPTION = """\
Verse-aligned Spanish-English Bible: Reina-Valera 1909 (SWORD module
spaRV1909eb) and the World English Bible (engWEB2015eb), public domain, from
the Debian packages sword-text-sparv and sword-text-web. Pairs whose Spanish
and King James (engKJV2006eb) Strong's numbers overlap by Dice < 0.3, or whose
length ratios es/en or WEB/KJV leave [0.5, 2], are dropped as misaligned.
Split by chapter index (0-based, KJV order) mod 30: 0 validation, 15 test.
"""


class BibleEsEn(tfds.core.GeneratorBasedBuilder):
  """Spanish→English Bible verse pairs from locally installed SWORD modules."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
      "1.0.0": "Strong's-Dice alignment filter, chapter split.",
      "1.1.0": "Spanish chapter openings truecased (\"Y FUERON\" -> \"Y fueron\").",
  }

  def __init__(self, *, file_format=None, **kwargs):
    # array_record unless asked otherwise: readable by tfds.data_source and
    # Grain without TensorFlow (tfds's own default, tfrecord, needs TF).
    super().__init__(file_format=file_format or "array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=_DESCRIPTION,
        features=tfds.features.FeaturesDict({
            "es": tfds.features.Text(),
            "en": tfds.features.Text(),
            "ref": tfds.features.Text(),
        }),
        supervised_keys=("es", "en"),
        disable_shuffling=True,
        homepage="https://crosswire.org/sword/modules/",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the modules are Debian packages.
    splits = bible_alignment.aligned_pairs()
    return {name: self._generate_examples(pairs) for name, pairs in splits.items()}

  def _generate_examples(self, pairs):
    for pair in pairs:
      yield pair.ref, {"es": pair.es, "en": pair.en, "ref": pair.ref}
