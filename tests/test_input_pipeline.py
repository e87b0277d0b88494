"""train/input_pipeline.py: packing, efficiency, determinism, resume, eval."""

import collections
import json

import jax
import ml_collections
import numpy as np
import pytest

from train import checkpointing, input_pipeline
from train import sharding as sharding_lib
from train.datasets import sources
from experiments import configs
from train.batches import BATCH_KEYS
from train.steps import TrainState

ROWS = 32


@pytest.fixture()
def small_config(bible_config, tmp_path):
  """The Bible validation split as a small training set, via parallel_text."""
  source = sources.get_source(bible_config, "validation")
  pairs = source.get_many(range(len(source)))
  tsv = tmp_path / "small.tsv"
  tsv.write_text("".join(f"{p['src']}\t{p['tgt']}\n" for p in pairs), encoding="utf-8")
  config = configs.data_config()
  config.name = "parallel_text"
  config.train_tsv_file = str(tsv)
  config.eval_tsv_file = str(tsv)
  config.max_len = 64
  return config, pairs


def segments(row_tokens, row_segment_ids, row_positions):
  """[(segment id, tokens)] of one packed row, checking positions."""
  out = []
  ids = row_segment_ids[row_segment_ids > 0]
  assert (row_segment_ids[len(ids):] == 0).all()  # padding only at the end
  assert (row_tokens[len(ids):] == 0).all() and (row_positions[len(ids):] == 0).all()
  for seg in np.unique(ids):
    where = np.flatnonzero(row_segment_ids == seg)
    assert (np.diff(where) == 1).all()  # contiguous
    assert (row_positions[where] == np.arange(len(where))).all()
    out.append((int(seg), tuple(row_tokens[where].tolist())))
  assert [s for s, _ in out] == list(range(1, len(out) + 1))  # 1, 2, ... in order
  return out


def test_packing_keeps_every_token_once_in_order(small_config, bible_tokenizer):
  config, pairs = small_config
  ds, limiter = input_pipeline.make_train_dataset(
      config, bible_tokenizer, ROWS, num_epochs=1)
  packed = collections.Counter()
  for batch in ds:
    for key, value in batch.items():
      assert value.dtype == np.int32 and value.shape[1] == config.max_len
    for r in range(len(batch["src"])):
      src = segments(batch["src"][r], batch["src_segment_ids"][r], batch["src_positions"][r])
      tgt = segments(batch["tgt"][r], batch["tgt_segment_ids"][r], batch["tgt_positions"][r])
      assert len(src) == len(tgt)  # src segment k and tgt segment k: one pair
      packed.update((s, t) for (_, s), (_, t) in zip(src, tgt))
  expected = collections.Counter()
  for p in pairs:
    s, t = bible_tokenizer.encode_batch([p["src"], p["tgt"]])
    if len(s) <= config.max_len and len(t) <= config.max_len:
      expected[(tuple(s.tolist()), tuple(t.tolist()))] += 1
  assert packed == expected
  assert limiter.stats.seen == len(pairs)
  assert limiter.stats.dropped == len(pairs) - sum(expected.values()) > 0
  for s, t in packed:
    assert s[-1] == t[-1] == bible_tokenizer.eos_id


def test_truncate_keeps_long_pairs_with_eos(small_config, bible_tokenizer):
  config, pairs = small_config
  config.long_pairs = "truncate"
  config.max_len = 24
  ds, limiter = input_pipeline.make_train_dataset(
      config, bible_tokenizer, ROWS, num_epochs=1)
  batches = list(ds)
  num_segments = sum(int(b["tgt_segment_ids"].max(axis=1).sum()) for b in batches)
  assert num_segments == len(pairs)  # nothing dropped
  assert limiter.stats.truncated > 0 and limiter.stats.dropped == 0
  config.long_pairs = "keep"
  with pytest.raises(ValueError, match="long_pairs"):
    input_pipeline.make_train_dataset(config, bible_tokenizer, ROWS)


def test_pack_efficiency_on_bible_train(bible_config, bible_tokenizer):
  it = input_pipeline.make_train_iterator(bible_config, bible_tokenizer, 64)
  batches = [next(it) for _ in range(24)]
  for batch in batches:
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        k: ((64, 128), np.int32) for k in BATCH_KEYS}
  efficiency = input_pipeline.pack_efficiency(batches)
  print(f"pack efficiency, Bible train, max_len 128, 64 rows: {efficiency}")
  assert min(efficiency.values()) >= 0.9
  # bible_es_en's own batch: 16 rows.
  it = input_pipeline.make_train_iterator(bible_config, bible_tokenizer, 16)
  efficiency = input_pipeline.pack_efficiency([next(it) for _ in range(200)])
  assert min(efficiency.values()) >= 0.92


def test_same_seed_same_batches_and_other_seed_differs(small_config, bible_tokenizer):
  config, _ = small_config
  first = input_pipeline.make_train_iterator(config, bible_tokenizer, ROWS)
  second = input_pipeline.make_train_iterator(config, bible_tokenizer, ROWS)
  seed0 = None
  for _ in range(6):  # more than one epoch of the small set
    a, b = next(first), next(second)
    seed0 = a if seed0 is None else seed0
    assert all((a[k] == b[k]).all() for k in BATCH_KEYS)
  config.seed = 1
  seed1 = next(input_pipeline.make_train_iterator(config, bible_tokenizer, ROWS))
  assert not (seed1["tgt"] == seed0["tgt"]).all()


def test_resume_from_state_gives_identical_batches(small_config, bible_tokenizer):
  config, _ = small_config
  it = input_pipeline.make_train_iterator(config, bible_tokenizer, ROWS)
  for _ in range(5):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # JSON round trip, as saved
  expected = [next(it) for _ in range(4)]
  resumed = input_pipeline.make_train_iterator(config, bible_tokenizer, ROWS)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    assert all((got[k] == want[k]).all() for k in BATCH_KEYS)


def test_resume_through_the_trainers_checkpointer(small_config, bible_tokenizer, tmp_path):
  """The iterator state goes into the Orbax checkpoint via train/checkpointing.py."""
  config, _ = small_config
  it = input_pipeline.make_train_iterator(config, bible_tokenizer, ROWS)
  for _ in range(3):
    next(it)
  # A train state without a model: the fields checkpoints save.
  state = TrainState(step=np.array(3, np.int32), params={"w": np.arange(4.0)},
                     opt_state={"m": np.zeros(2)})
  ckpt = checkpointing.Checkpointer(tmp_path / "ckpt")
  ckpt.save(3, state, it, {"note": "test"}, force=True)
  ckpt.wait()
  ckpt.close()
  expected = [next(it) for _ in range(3)]
  fresh = input_pipeline.make_train_iterator(config, bible_tokenizer, ROWS)
  reader = checkpointing.Checkpointer(tmp_path / "ckpt")
  restored = reader.restore(3, state, data_iterator=fresh)
  reader.close()
  assert int(restored.step) == 3
  for want in expected:
    got = next(fresh)
    assert all((got[k] == want[k]).all() for k in BATCH_KEYS)


def test_each_process_reads_its_own_part(small_config, bible_tokenizer):
  config, pairs = small_config
  seen = []
  for process in range(2):
    ev = input_pipeline.make_eval_data(
        config, bible_tokenizer, ROWS, process_index=process, process_count=2)
    indices = np.concatenate([b["index"][b["row_mask"] == 1] for b in ev.batches()])
    assert len(list(ev.batches())) == ev.num_batches
    seen.append(set(indices.tolist()))
    batch = next(input_pipeline.make_train_iterator(
        config, bible_tokenizer, ROWS, process_index=process, process_count=2))
    assert batch["src"].shape == (ROWS // 2, config.max_len)
  assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(len(pairs)))
  with pytest.raises(ValueError, match="not divisible"):
    input_pipeline.make_train_iterator(
        config, bible_tokenizer, 33, process_index=0, process_count=2)


def test_eval_batches_ordered_unpacked_and_padded(bible_config, bible_tokenizer):
  ev = input_pipeline.make_eval_data(bible_config, bible_tokenizer, 64, split="test")
  batches = list(ev.batches())
  assert len(batches) == ev.num_batches == -(-len(ev.sources) // 64)
  indices = np.concatenate([b["index"] for b in batches])
  mask = np.concatenate([b["row_mask"] for b in batches])
  assert mask.sum() == len(ev.sources) == len(ev.references)
  assert (indices[mask == 1] == np.arange(len(ev.sources))).all()
  assert (indices[mask == 0] == -1).all() and mask[-1] == 0
  last = batches[-1]
  assert (last["src"][last["row_mask"] == 0] == 0).all()
  for b in batches:
    assert b["src_segment_ids"].max() <= 1  # one pair per row: no packing
    assert ((b["tgt"] != 0) == (b["tgt_segment_ids"] == 1)).all()
  first = batches[0]
  assert bible_tokenizer.decode(first["src"][0]) == ev.sources[0]
  assert bible_tokenizer.decode(first["tgt"][3]) == ev.references[3]


def test_eval_counts_the_pairs_it_truncates(bible_config, bible_tokenizer):
  config = ml_collections.ConfigDict(bible_config.to_dict())
  config.max_len = 24
  ev = input_pipeline.make_eval_data(config, bible_tokenizer, 64, split="test")
  src = bible_tokenizer.encode_batch(ev.sources)
  tgt = bible_tokenizer.encode_batch(ev.references)
  long = sum(len(s) > 24 or len(t) > 24 for s, t in zip(src, tgt))
  assert 0 < long < len(ev.sources)
  assert ev.stats == input_pipeline.LengthStats(len(ev.sources), 0, long)
  row = next(ev.batches())
  assert (row["src"][:, -1] != 0).any()   # cut at max_len, not dropped


def test_make_global_batch(bible_config, bible_tokenizer):
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None))
  ev = input_pipeline.make_eval_data(bible_config, bible_tokenizer, 8 * jax.device_count())
  host = next(ev.batches())
  global_batch = sharding_lib.make_global_batch(host, sharding)
  for key, value in global_batch.items():
    assert isinstance(value, jax.Array) and value.shape == host[key].shape
    assert (np.asarray(value) == host[key]).all()
  assert global_batch["row_mask"].sharding.spec == jax.sharding.PartitionSpec("data")
