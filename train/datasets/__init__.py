"""Datasets: the offline Bible corpus as a tfds builder, and user parallel text.

Importing this package registers the tfds builder `bible_es_en`
(`train.datasets.bible_es_en.BibleEsEn`); `tfds.data_source("bible_es_en",
split=...)` then builds it on first use into the tfds data_dir
($TFDS_DATA_DIR or ~/tensorflow_datasets unless `data_dir=` is given).

Modules:
  sword            read SWORD modules (cached decompression), missing-module error
  osis             OSIS markup -> text; Strong's numbers
  bible_alignment  verse alignment, misalignment filter, chapter split rule
  bible_es_en      the tfds builder
  parallel_text    the user's own line-aligned files or TSV
  sources          one random-access view of any of them: {"src", "tgt"} strings
"""

from train.datasets import bible_es_en  # noqa: F401  (registers the builder)
from train.datasets.bible_es_en import BibleEsEn

__all__ = ["BibleEsEn"]
