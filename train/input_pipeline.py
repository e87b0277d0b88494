"""Input pipeline: source → tokenize → length limit → pack / pad → host batches.

Entry points (`data_config` is `config.data`, see `data_config()` in
experiments/configs/__init__.py; `batch_size` is the *global* batch in rows,
`config.batch_size`):

    tok = train_or_load_tokenizer(config.data, workdir)  # <workdir>/tokenizer/spm.model
    it = make_train_iterator(config.data, tok, config.batch_size)
    batch = next(it)                    # dict of np.int32 [batch_size // process_count, max_len]
    state = it.get_state(); it.set_state(state)   # exact resume (JSON-able dict)
    ev = make_eval_data(config.data, tok, config.batch_size)  # split = eval_split
    for batch in ev.batches(): ...      # fixed shape, last batch padded with empty rows
    ev.sources[i], ev.references[i]     # raw strings of the split, original order

The batch layout (keys, segment ids, positions, eval `row_mask` / `index`) is
documented in train/batches.py.

Training: each process reads every `process_count`-th pair from
`process_index` on (`jax.process_index()`/`jax.process_count()`), shuffles
with `seed` (reshuffled every epoch), repeats forever, drops or truncates
pairs longer than `max_len` tokens (`long_pairs`), and packs several pairs
into each row (Grain first-fit packing). Evaluation does not pack and keeps
the split's order; over-long eval pairs are truncated, never dropped, so
BLEU covers the whole split (the raw references stay complete).

Saving the iterator state in an Orbax checkpoint (Grain's handler):
    import grain, orbax.checkpoint as ocp
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(it)))
    mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(it)))   # restores `it` in place
Each process writes `process_<i>-of-<n>.json` (its own `it.get_state()`).
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Iterator

import grain
import jax
import numpy as np
from absl import logging

import tokenizer as tokenizer_lib
from train.batches import empty_eval_batch
from train.datasets import sources

LONG_PAIRS = ("drop", "truncate")


# --- tokenizer ---------------------------------------------------------------


def tokenizer_training_text(data_config) -> list[str]:
  """Source and target sentences of (an even sample of) the training split."""
  source = sources.get_source(data_config, data_config.train_split)
  num_pairs = min(len(source), max(1, data_config.spm_max_sentences // 2))
  indices = np.linspace(0, len(source) - 1, num_pairs).astype(int).tolist()
  texts = []
  for pair in source.get_many(indices):
    texts.append(pair["src"])
    texts.append(pair["tgt"])
  return texts


def train_or_load_tokenizer(data_config, workdir: str) -> tokenizer_lib.Tokenizer:
  """The run's joint SentencePiece model, trained on the train split if new."""
  return tokenizer_lib.train_or_load(
      data_config, workdir, lambda: tokenizer_training_text(data_config)
  )


# --- tokenize and limit length -------------------------------------------------


@dataclasses.dataclass
class LengthStats:
  """Counts of pairs seen by the length limit (approximate under threads)."""

  seen: int = 0
  dropped: int = 0
  truncated: int = 0


class _TokenizeAndLimit:
  """{"src": str, "tgt": str} -> {"src": ids, "tgt": ids}, or None if dropped."""

  def __init__(self, tok, max_len: int, long_pairs: str, epoch_size: int,
               what: str):
    if long_pairs not in LONG_PAIRS:
      raise ValueError(
          f"config.data.long_pairs={long_pairs!r}; use one of {LONG_PAIRS}."
      )
    self._tok = tok
    self._max_len = max_len
    self._truncate = long_pairs == "truncate"
    self._epoch_size = epoch_size
    self._what = what
    self._lock = threading.Lock()
    self.stats = LengthStats()

  def _limit(self, ids: np.ndarray) -> np.ndarray:
    return np.append(ids[: self._max_len - 1], np.int32(self._tok.eos_id))

  def __call__(self, pair: dict[str, str]) -> dict[str, np.ndarray] | None:
    src, tgt = self._tok.encode_batch([pair["src"], pair["tgt"]])
    too_long = len(src) > self._max_len or len(tgt) > self._max_len
    with self._lock:
      self.stats.seen += 1
      if too_long:
        if self._truncate:
          self.stats.truncated += 1
        else:
          self.stats.dropped += 1
      if self.stats.seen == self._epoch_size:
        self.log()
    if too_long:
      if not self._truncate:
        return None
      src, tgt = self._limit(src), self._limit(tgt)
    return {"src": src, "tgt": tgt}

  def log(self):
    logging.info(
        "%s: %d pairs read, %d longer than max_len=%d dropped, %d truncated.",
        self._what, self.stats.seen, self.stats.dropped, self._max_len,
        self.stats.truncated,
    )


# --- training --------------------------------------------------------------------


def _host_rows(batch_size: int, process_count: int) -> int:
  if batch_size % process_count:
    raise ValueError(
        f"batch_size={batch_size} is not divisible by the {process_count} "
        "processes; choose a multiple of jax.process_count()."
    )
  return batch_size // process_count


def make_train_dataset(
    data_config,
    tok: tokenizer_lib.Tokenizer,
    batch_size: int,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    num_epochs: int | None = None,
) -> tuple[grain.IterDataset, _TokenizeAndLimit]:
  """The packed, batched training `IterDataset` of this process.

  `num_epochs=None` repeats forever and drops nothing; a finite `num_epochs`
  (tests, one-off passes) keeps the last, partial batch.

  Returns:
    (dataset of dicts of np.int32 [batch_size // process_count, max_len],
     the length limiter, whose `.stats` counts dropped/truncated pairs).
  """
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  rows = _host_rows(batch_size, pc)
  source = sources.get_source(data_config, data_config.train_split)
  ds = grain.MapDataset.source(source)[pi::pc]
  if len(ds) == 0:
    raise ValueError(f"No training pairs for process {pi} in {source!r}.")
  limiter = _TokenizeAndLimit(
      tok, data_config.max_len, data_config.long_pairs, len(ds),
      f"{source.description} (process {pi}/{pc}, first epoch)",
  )
  ds = ds.shuffle(seed=data_config.seed).repeat(num_epochs)
  ds = ds.map(limiter).filter(lambda x: x is not None)
  ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=data_config.read_threads,
      prefetch_buffer_size=data_config.prefetch_buffer_size,
  ))
  length = {"src": data_config.max_len, "tgt": data_config.max_len}
  ds = grain.experimental.FirstFitPackIterDataset(
      ds,
      length_struct=length,
      num_packing_bins=data_config.num_packing_bins or rows,
      seed=data_config.seed,
      shuffle_bins=True,
  )
  ds = ds.batch(rows, drop_remainder=num_epochs is None)
  return ds, limiter


def make_train_iterator(
    data_config, tok: tokenizer_lib.Tokenizer, batch_size: int, **kwargs
) -> grain.DatasetIterator:
  """Infinite iterator of packed host batches; has get_state()/set_state()."""
  ds, _ = make_train_dataset(data_config, tok, batch_size, **kwargs)
  return iter(ds)


# --- evaluation ------------------------------------------------------------------


def _padded(ids: np.ndarray, max_len: int) -> dict[str, np.ndarray]:
  """One unpacked sequence -> (tokens, segment ids, positions), each [max_len]."""
  n = min(len(ids), max_len)
  tokens = np.zeros(max_len, np.int32)
  tokens[:n] = ids[:n]
  segment_ids = np.zeros(max_len, np.int32)
  segment_ids[:n] = 1
  positions = np.zeros(max_len, np.int32)
  positions[:n] = np.arange(n, dtype=np.int32)
  return tokens, segment_ids, positions


@dataclasses.dataclass
class EvalData:
  """One evaluation split, batched for this process, plus its raw strings.

  Attributes:
    sources, references: raw source / reference strings of the whole split
      (every process holds all of them), in the split's order.
    rows: rows per host batch; num_batches: batches per process (the same on
      every process, so collective eval steps line up).
  """

  sources: list[str]
  references: list[str]
  rows: int
  max_len: int
  num_batches: int
  _dataset: grain.MapDataset
  stats: LengthStats

  def batches(self) -> Iterator[dict[str, np.ndarray]]:
    """Fixed-shape host batches, in order; a fresh pass on every call."""
    count = 0
    for batch in self._dataset:
      count += 1
      yield batch
    for _ in range(self.num_batches - count):
      yield empty_eval_batch(self.rows, self.max_len)

  def __len__(self) -> int:
    return self.num_batches


def make_eval_data(
    data_config,
    tok: tokenizer_lib.Tokenizer,
    batch_size: int,
    split: str | None = None,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> EvalData:
  """Unpacked, ordered eval batches of `split` (default `eval_split`)."""
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  rows = _host_rows(batch_size, pc)
  max_len = data_config.max_len
  source = sources.get_source(data_config, split or data_config.eval_split)
  pairs = source.get_many(range(len(source)))
  src_ids = tok.encode_batch([p["src"] for p in pairs])
  tgt_ids = tok.encode_batch([p["tgt"] for p in pairs])
  stats = LengthStats(seen=len(pairs), truncated=sum(
      len(s) > max_len or len(t) > max_len for s, t in zip(src_ids, tgt_ids)
  ))
  logging.info("%s: %d pairs, %d truncated to max_len=%d for evaluation.",
               source.description, stats.seen, stats.truncated, max_len)

  def make_row(index: int) -> dict[str, np.ndarray]:
    row = {"row_mask": np.int32(1), "index": np.int32(index)}
    for side, ids in (("src", src_ids[index]), ("tgt", tgt_ids[index])):
      tokens, segment_ids, positions = _padded(ids, max_len)
      row[side] = tokens
      row[f"{side}_segment_ids"] = segment_ids
      row[f"{side}_positions"] = positions
    return row

  def pad_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    missing = rows - len(batch["index"])
    if missing:
      empty = empty_eval_batch(missing, max_len)
      batch = {k: np.concatenate([v, empty[k]]) for k, v in batch.items()}
    return batch

  ds = grain.MapDataset.range(len(pairs))[pi::pc].map(make_row)
  ds = ds.batch(rows, drop_remainder=False).map(pad_rows)
  per_process = math.ceil(len(pairs) / pc)
  return EvalData(
      sources=[p["src"] for p in pairs],
      references=[p["tgt"] for p in pairs],
      rows=rows,
      max_len=max_len,
      num_batches=math.ceil(per_process / rows),
      _dataset=ds,
      stats=stats,
  )


# --- measurements ----------------------------------------------------------------


def pack_efficiency(batches) -> dict[str, float]:
  """Fraction of non-padding tokens in `src` and `tgt` over some batches."""
  used = {"src": 0, "tgt": 0}
  total = 0
  for batch in batches:
    for side in used:
      used[side] += int(np.count_nonzero(batch[f"{side}_segment_ids"]))
    total += batch["src"].size
  return {side: n / total for side, n in used.items()}
