"""WMT through tfds's own builders, end to end on `tfds.testing.mock_data`.

Nothing can be downloaded here, so tfds generates random examples from the
builders' feature specs (MockPolicy.USE_CODE: no metadata files needed).
"""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from train import input_pipeline
from train.datasets import sources
from experiments import configs
from train.batches import BATCH_KEYS


@pytest.mark.parametrize(
    "name,source_lang,target_lang",
    [("wmt14_translate/de-en", "en", "de"), ("wmt17_translate/de-en", "de", "en")],
)
def test_wmt_mock_yields_packed_batches(tmp_path, name, source_lang, target_lang):
  config = configs.data_config()
  config.name = name
  config.source_lang, config.target_lang = source_lang, target_lang
  config.data_dir = "gs://not-read/under/mock"  # Any data_dir; mock_data serves.
  config.vocab_size = 200
  config.max_len = 64
  sources.ensure_registered(name)  # tfds registers WMT lazily without TF
  with tfds.testing.mock_data(num_examples=48, policy=tfds.testing.MockPolicy.USE_CODE):
    raw = tfds.data_source(name, split="train", data_dir=config.data_dir)[5]
    pairs = sources.get_source(config, "train")
    assert len(pairs) == 48
    # The direction switch: src/tgt are the configured features.
    text = lambda v: v.decode() if isinstance(v, bytes) else v
    assert pairs[5] == {"src": text(raw[source_lang]), "tgt": text(raw[target_lang])}
    assert pairs[5]["src"] != pairs[5]["tgt"]
    tok = input_pipeline.train_or_load_tokenizer(config, str(tmp_path))
    it = input_pipeline.make_train_iterator(config, tok, 8)
    batches = [next(it) for _ in range(3)]
    ev = input_pipeline.make_eval_data(config, tok, 8, split="test")
    eval_batches = list(ev.batches())
  for batch in batches:
    assert set(batch) == set(BATCH_KEYS)
    for value in batch.values():
      assert value.shape == (8, 64) and value.dtype == np.int32
    assert batch["src_segment_ids"].max() >= 1 and batch["tgt_segment_ids"].min() == 0
    # Packed rows: ids only where segment ids are non-zero.
    for side in ("src", "tgt"):
      assert ((batch[side] != 0) == (batch[f"{side}_segment_ids"] != 0)).all()
  assert len(eval_batches) == ev.num_batches == 6
  assert sum(int(b["row_mask"].sum()) for b in eval_batches) == 48
  assert eval_batches[0]["src"].shape == (8, 64)
