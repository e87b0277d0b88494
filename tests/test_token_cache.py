"""train/token_cache.py and the array pipeline built on it: reuse,
invalidation, parallel encoding, sharding, blocks and resume."""

import collections
import errno
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import model
import tokenizer as tokenizer_lib
from experiments import configs
from train import input_pipeline, packing, token_cache
from train.batches import BATCH_KEYS
from train.datasets import sources

ROWS = 8


@pytest.fixture()
def tsv_config(bible_config, tmp_path):
  """300 Bible validation pairs as a parallel_text training set."""
  source = sources.get_source(bible_config, "validation")
  pairs = source.get_many(range(300))
  tsv = tmp_path / "data" / "train.tsv"
  tsv.parent.mkdir()
  tsv.write_text("".join(f"{p['src']}\t{p['tgt']}\n" for p in pairs), encoding="utf-8")
  config = configs.data_config()
  config.name = "parallel_text"
  config.train_tsv_file = config.eval_tsv_file = str(tsv)
  config.max_len = 64
  return config, pairs


def _count_tokenizations(monkeypatch) -> list:
  calls = []
  original = token_cache.tokenize_source

  def counting(source, model_proto, workers=0):
    calls.append(source.description)
    return original(source, model_proto, workers)

  monkeypatch.setattr(token_cache, "tokenize_source", counting)
  return calls


def _pairs_of(batches) -> collections.Counter:
  """(src ids, tgt ids) of every packed pair in some batches."""
  out = collections.Counter()
  for b in batches:
    for r in range(len(b["src"])):
      for seg in range(1, int(b["src_segment_ids"][r].max()) + 1):
        out[(tuple(b["src"][r][b["src_segment_ids"][r] == seg].tolist()),
             tuple(b["tgt"][r][b["tgt_segment_ids"][r] == seg].tolist()))] += 1
  return out


def test_ids_cached_beside_the_data_and_reused(tsv_config, bible_tokenizer, monkeypatch):
  config, pairs = tsv_config
  calls = _count_tokenizations(monkeypatch)
  first = list(input_pipeline.make_train_dataset(
      config, bible_tokenizer, ROWS, num_epochs=1)[0])
  files = os.listdir(os.path.join(os.path.dirname(config.train_tsv_file), "token_ids"))
  assert [f for f in files if f.endswith(".npz")] and len(calls) == 1
  second = list(input_pipeline.make_train_dataset(
      config, bible_tokenizer, ROWS, num_epochs=1)[0])
  assert len(calls) == 1  # read from the cache, not tokenized again
  assert len(first) == len(second)
  for a, b in zip(first, second):
    assert all((a[k] == b[k]).all() for k in BATCH_KEYS)
  source = sources.get_source(config, config.train_split)
  ids = token_cache.load_or_build(config, bible_tokenizer, source)
  expected = bible_tokenizer.encode_batch([p["src"] for p in pairs])
  assert all((ids.pair(i)[0] == expected[i]).all() for i in range(len(pairs)))


def test_changed_tokenizer_or_data_gets_other_ids(tsv_config, bible_tokenizer, monkeypatch):
  config, pairs = tsv_config
  calls = _count_tokenizations(monkeypatch)
  source = sources.get_source(config, config.train_split)
  token_cache.load_or_build(config, bible_tokenizer, source)
  other_tok = tokenizer_lib.train(
      [p["src"] for p in pairs] + [p["tgt"] for p in pairs], vocab_size=300)
  assert other_tok.fingerprint != bible_tokenizer.fingerprint
  ids = token_cache.load_or_build(config, other_tok, source)
  assert len(calls) == 2
  want = other_tok.encode_batch([pairs[5]["tgt"]])[0]
  assert (ids.pair(5)[1] == want).all()
  # The same file name with other contents: a new key, new ids.
  tsv = config.train_tsv_file
  with open(tsv, "a", encoding="utf-8") as f:
    f.write("Hola mundo.\tHello world.\n")
  changed = sources.get_source(config, config.train_split)
  assert token_cache.cache_path(config, bible_tokenizer, changed) != \
      token_cache.cache_path(config, bible_tokenizer, source)
  assert len(token_cache.load_or_build(config, bible_tokenizer, changed)) == len(pairs) + 1
  assert len(calls) == 3


def test_max_len_is_applied_after_the_cache(tsv_config, bible_tokenizer):
  """One cache for every max_len: each max_len sees the full pairs it allows."""
  config, pairs = tsv_config
  encoded = [tuple(tuple(x.tolist()) for x in bible_tokenizer.encode_batch([p["src"], p["tgt"]]))
             for p in pairs]
  for max_len, long_pairs in ((24, "truncate"), (64, "drop"), (40, "drop")):
    config.max_len, config.long_pairs = max_len, long_pairs
    batches, limit = input_pipeline.make_train_dataset(
        config, bible_tokenizer, ROWS, num_epochs=1)
    got = _pairs_of(batches)
    if long_pairs == "drop":
      want = collections.Counter(
          (s, t) for s, t in encoded if len(s) <= max_len and len(t) <= max_len)
      assert limit.stats.dropped == len(pairs) - sum(want.values()) > 0
    else:
      cut = lambda ids: ids if len(ids) <= max_len else ids[:max_len - 1] + (1,)
      want = collections.Counter((cut(s), cut(t)) for s, t in encoded)
      assert limit.stats.truncated > 0
    assert got == want, (max_len, long_pairs)


def test_parallel_encoding_matches_one_process(bible_tokenizer, tsv_config, monkeypatch):
  _, pairs = tsv_config
  texts = [p["src"] for p in pairs] + [p["tgt"] for p in pairs]
  monkeypatch.setattr(token_cache, "CHUNK", 64)
  monkeypatch.setattr(token_cache, "MIN_PARALLEL", 0)
  flat, offsets = token_cache.encode_texts(bible_tokenizer.model_proto, texts, workers=2)
  expected = bible_tokenizer.encode_batch(texts)
  assert offsets[0] == 0 and len(offsets) == len(texts) + 1
  for i, want in enumerate(expected):
    assert (flat[offsets[i]:offsets[i + 1]] == want).all()


_BUILD_CHILD = """
import json, sys
import tokenizer
from experiments import configs
from train import token_cache
from train.datasets import sources
config = configs.data_config()
config.name = "parallel_text"
config.train_tsv_file = sys.argv[1]
tok = tokenizer.load(sys.argv[2])
calls = []
original = token_cache.tokenize_source
token_cache.tokenize_source = lambda *a, **k: calls.append(1) or original(*a, **k)
ids = token_cache.load_or_build(config, tok, sources.get_source(config, "train"))
print(json.dumps({"tokenized": len(calls), "sum": int(ids.src_ids.sum()),
                  "n": len(ids)}))
"""


def test_processes_started_together_tokenize_once(tsv_config, bible_tokenizer, tmp_path):
  config, pairs = tsv_config
  model = tmp_path / "spm.model"
  tokenizer_lib.save(bible_tokenizer, model)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
  children = [subprocess.Popen(
      [sys.executable, "-c", _BUILD_CHILD, config.train_tsv_file, str(model)],
      stdout=subprocess.PIPE, env=env, text=True) for _ in range(2)]
  reports = [json.loads(c.communicate(timeout=300)[0].strip().splitlines()[-1])
             for c in children]
  assert sorted(r["tokenized"] for r in reports) == [0, 1]
  assert reports[0]["sum"] == reports[1]["sum"] and reports[0]["n"] == len(pairs)


def test_remote_cache_readers_wait_for_the_writer(tsv_config, bible_tokenizer, tmp_path,
                                                  monkeypatch):
  """Off a local disk, process 0 writes and the others read what it wrote."""
  config, _ = tsv_config
  source = sources.get_source(config, config.train_split)
  path = tmp_path / "remote" / "ids.npz"
  monkeypatch.setattr(token_cache, "cache_path", lambda *a: path)
  with pytest.raises(TimeoutError, match="process 0"):
    token_cache._wait_and_load(path, timeout_s=0.1)  # pylint: disable=protected-access
  written = token_cache.tokenize_source(source, bible_tokenizer.model_proto, 1)
  token_cache.save(written, path)
  read = token_cache._wait_and_load(path, timeout_s=1)  # pylint: disable=protected-access
  assert (read.tgt_ids == written.tgt_ids).all()
  assert (read.tgt_offsets == written.tgt_offsets).all()


def test_shards_of_two_processes_split_the_pairs(tsv_config, bible_tokenizer):
  config, pairs = tsv_config
  config.long_pairs = "truncate"
  config.max_len = 128
  shards = [_pairs_of(input_pipeline.make_train_dataset(
      config, bible_tokenizer, ROWS, process_index=p, process_count=2,
      num_epochs=1)[0]) for p in range(2)]
  everything = _pairs_of(input_pipeline.make_train_dataset(
      config, bible_tokenizer, ROWS, process_index=0, process_count=1,
      num_epochs=1)[0])
  assert shards[0] + shards[1] == everything
  assert sum(everything.values()) == len(pairs)
  assert abs(sum(shards[0].values()) - sum(shards[1].values())) <= 1


def test_small_blocks_keep_every_pair_once_an_epoch_and_resume(tsv_config, bible_tokenizer):
  config, pairs = tsv_config
  config.long_pairs = "truncate"
  make = lambda **kw: input_pipeline.make_train_dataset(
      config, bible_tokenizer, ROWS, block_pairs=37, **kw)[0]
  one_epoch = _pairs_of(make(num_epochs=1))
  assert sum(one_epoch.values()) == len(pairs)
  it = make()
  seen = [next(it) for _ in range(40)]  # several blocks and epochs
  assert it.get_state()["epoch"] >= 1
  for start in (3, 11, 29):
    resumed = make()
    fresh = make()
    for _ in range(start):
      next(fresh)
    resumed.set_state(json.loads(json.dumps(fresh.get_state())))
    for want in seen[start:start + 6]:
      got = next(resumed)
      assert all((got[k] == want[k]).all() for k in BATCH_KEYS)
  with pytest.raises(ValueError, match="another version"):
    it.set_state({"parents": [], "index": 3})


def test_assemble_matches_a_row_by_row_layout(bible_tokenizer, tsv_config):
  """packing.assemble against rows written one pair at a time."""
  _, pairs = tsv_config
  texts = [p["src"] for p in pairs[:60]] + [p["tgt"] for p in pairs[:60]]
  flat, offsets = token_cache.encode_texts(bible_tokenizer.model_proto, texts, 1)
  split = token_cache.TokenizedSplit(flat, offsets[:61], flat, offsets[60:])
  order = np.random.default_rng(3).permutation(60)
  max_len = 96
  sl = np.minimum(split.src_lengths()[order], max_len)
  tl = np.minimum(split.tgt_lengths()[order], max_len)
  plan = packing.pack(sl, tl, max_len, open_bins=4)
  got = packing.assemble(split, order, plan, max_len, eos_id=1)
  want = {k: np.zeros((plan.num_rows, max_len), np.int32) for k in BATCH_KEYS}
  for i, p in enumerate(order):
    for side, col in (("src", plan.src_col[i]), ("tgt", plan.tgt_col[i])):
      ids = split.pair(p)[0 if side == "src" else 1]
      if len(ids) > max_len:
        ids = np.append(ids[:max_len - 1], 1)
      span = slice(col, col + len(ids))
      assert col + len(ids) <= max_len
      want[side][plan.row[i], span] = ids
      want[f"{side}_segment_ids"][plan.row[i], span] = plan.segment[i]
      want[f"{side}_positions"][plan.row[i], span] = np.arange(len(ids))
  for k in BATCH_KEYS:
    assert (got[k] == want[k]).all(), k
  assert plan.num_rows < 60 * 2 / 3  # several pairs a row


def test_unwritable_cache_folder_says_which_setting(tsv_config, bible_tokenizer,
                                                    monkeypatch):
  config, _ = tsv_config
  source = sources.get_source(config, config.train_split)

  for error in (PermissionError(errno.EACCES, "Permission denied"),
                OSError(errno.EROFS, "Read-only file system")):
    def refuse(*args, error=error):
      raise error

    monkeypatch.setattr(token_cache, "save", refuse)
    # A ConfigError: python -m train reports it in one line, exit 2.
    with pytest.raises(model.ConfigError, match="token_cache_dir"):
      token_cache.load_or_build(config, bible_tokenizer, source)
