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

Tokenizing: every split is tokenized once into flat id arrays, cached beside
the data and reused by later runs and hosts (train/token_cache.py).

Training: each process takes every `process_count`-th pair from
`process_index` on (`jax.process_index()`/`jax.process_count()`), drops or
truncates pairs longer than `max_len` tokens (`long_pairs`), shuffles with
`seed` (reshuffled every epoch), repeats forever, and packs several pairs
into each row (best fit, train/packing.py) in blocks of `BLOCK_PAIRS`
pairs, whose rows are shuffled too (`PackedBatches`). Evaluation does not
pack and keeps the split's order; over-long eval pairs are truncated, never
dropped, so BLEU covers the whole split (the raw references stay complete).

Checkpointing: train/checkpointing.py saves `it.get_state()` (JSON) in the
Orbax checkpoint through Grain's checkpoint handler, one
`process_<i>-of-<n>.json` per process, and restores it into a fresh iterator
(`Checkpointer.save(step, state, it, ...)` / `.restore(step, abstract, it)`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator

import grain
import jax
import numpy as np
from absl import logging

import tokenizer as tokenizer_lib
from train import packing, token_cache
from train.batches import BATCH_KEYS, empty_eval_batch
from train.datasets import sources

LONG_PAIRS = ("drop", "truncate")
BLOCK_PAIRS = 1 << 16  # pairs packed at a time (one Bible epoch; WMT: ~70 a epoch)


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


# --- length limit ----------------------------------------------------------------


@dataclasses.dataclass
class LengthStats:
  """Counts of pairs seen by the length limit."""

  seen: int = 0
  dropped: int = 0
  truncated: int = 0


@dataclasses.dataclass
class LengthLimit:
  """Which pairs of a shard train, and how many were dropped or truncated."""

  kept: np.ndarray  # int64 [pairs kept]: indices into the tokenized split
  stats: LengthStats


def limit_lengths(tokenized: token_cache.TokenizedSplit, shard: np.ndarray,
                  max_len: int, long_pairs: str) -> LengthLimit:
  """Applies `long_pairs` ("drop" | "truncate") to the pairs `shard`."""
  if long_pairs not in LONG_PAIRS:
    raise ValueError(
        f"config.data.long_pairs={long_pairs!r}; use one of {LONG_PAIRS}."
    )
  too_long = ((tokenized.src_lengths()[shard] > max_len)
              | (tokenized.tgt_lengths()[shard] > max_len))
  num_long = int(too_long.sum())
  if long_pairs == "truncate":
    return LengthLimit(shard, LengthStats(len(shard), 0, num_long))
  return LengthLimit(shard[~too_long], LengthStats(len(shard), num_long, 0))


# --- training --------------------------------------------------------------------


def _host_rows(batch_size: int, process_count: int) -> int:
  if batch_size % process_count:
    raise ValueError(
        f"batch_size={batch_size} is not divisible by the {process_count} "
        "processes; choose a multiple of jax.process_count()."
    )
  return batch_size // process_count


class PackedBatches:
  """Packed host batches from a tokenized split: an iterator with state.

  Epoch e visits the kept pairs in the order of a permutation drawn from
  (seed, e); the order is cut into blocks of `block_pairs` pairs, each block
  packed (train/packing.py) and its rows shuffled with (seed, e, block). The
  rows of all blocks and epochs form one stream; each batch is the next
  `rows` rows of it (the last batch of a finite run may be shorter).

  get_state() -> {"epoch", "block", "row"}: where the next batch starts, a
  JSON-able dict; set_state() of it reproduces exactly the batches that
  followed. Batch i depends only on (data, seed, i): same seed, same batches.
  """

  def __init__(self, tokenized: token_cache.TokenizedSplit, kept: np.ndarray,
               *, rows: int, max_len: int, eos_id: int, seed: int,
               open_bins: int, num_epochs: int | None = None,
               block_pairs: int = BLOCK_PAIRS):
    if not len(kept):
      raise ValueError("No training pairs left to pack (all longer than "
                       "max_len?); raise config.data.max_len or set "
                       "config.data.long_pairs='truncate'.")
    self._tokenized, self._kept = tokenized, kept
    self._rows, self._max_len, self._eos_id = rows, max_len, eos_id
    self._seed, self._open_bins = seed, open_bins
    self._num_epochs, self._block_pairs = num_epochs, block_pairs
    self._src_len = np.minimum(tokenized.src_lengths(), max_len)
    self._tgt_len = np.minimum(tokenized.tgt_lengths(), max_len)
    self._epoch = self._block = self._row = 0
    self._order = (-1, None)  # (epoch, its pair order)
    self._packed = (None, None)  # ((epoch, block), its rows)

  def get_state(self) -> dict:
    return {"epoch": self._epoch, "block": self._block, "row": self._row}

  def set_state(self, state: dict | bytes | str) -> None:
    if isinstance(state, (bytes, str)):
      state = json.loads(state)
    if not isinstance(state, dict) or not {"epoch", "block", "row"} <= set(state):
      raise ValueError(
          f"Training iterator state {str(state)[:200]!r} is not this input "
          "pipeline's ({'epoch', 'block', 'row'}): it was saved by another "
          "version of the pipeline. Start a fresh workdir for this run.")
    self._epoch, self._block, self._row = (
        int(state["epoch"]), int(state["block"]), int(state["row"]))

  def __iter__(self):
    return self

  def _epoch_order(self) -> np.ndarray:
    if self._order[0] != self._epoch:
      rng = np.random.default_rng([self._seed, self._epoch])
      self._order = (self._epoch, self._kept[rng.permutation(len(self._kept))])
    return self._order[1]

  def _block_rows(self) -> dict[str, np.ndarray]:
    """The current block's rows, each [block rows, max_len]."""
    key = (self._epoch, self._block)
    if self._packed[0] != key:
      start = self._block * self._block_pairs
      pairs = self._epoch_order()[start:start + self._block_pairs]
      plan = packing.pack(self._src_len[pairs], self._tgt_len[pairs],
                          self._max_len, self._open_bins)
      rng = np.random.default_rng([self._seed, self._epoch, self._block])
      plan.row = rng.permutation(plan.num_rows)[plan.row]
      self._packed = (key, packing.assemble(
          self._tokenized, pairs, plan, self._max_len, self._eos_id))
    return self._packed[1]

  def _advance_block(self) -> None:
    self._row = 0
    self._block += 1
    if self._block * self._block_pairs >= len(self._kept):
      self._block = 0
      self._epoch += 1

  def __next__(self) -> dict[str, np.ndarray]:
    pieces, need = [], self._rows
    while need and (self._num_epochs is None or self._epoch < self._num_epochs):
      block = self._block_rows()
      take = min(need, len(block["src"]) - self._row)
      pieces.append({k: v[self._row:self._row + take] for k, v in block.items()})
      self._row += take
      need -= take
      if self._row == len(block["src"]):
        self._advance_block()
    if not pieces:
      raise StopIteration
    if len(pieces) == 1:
      return {k: v.copy() for k, v in pieces[0].items()}
    return {k: np.concatenate([p[k] for p in pieces]) for k in BATCH_KEYS}


def make_train_dataset(
    data_config,
    tok: tokenizer_lib.Tokenizer,
    batch_size: int,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    num_epochs: int | None = None,
    block_pairs: int = BLOCK_PAIRS,
) -> tuple[PackedBatches, LengthLimit]:
  """The packed training batches of this process.

  `num_epochs=None` repeats forever; a finite `num_epochs` (tests, one-off
  passes) ends with the last, possibly partial batch.

  Returns:
    (iterator of dicts of np.int32 [batch_size // process_count, max_len],
     the length limit, whose `.stats` counts dropped/truncated pairs).
  """
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  rows = _host_rows(batch_size, pc)
  source = sources.get_source(data_config, data_config.train_split)
  tokenized = token_cache.load_or_build(data_config, tok, source)
  shard = np.arange(pi, len(tokenized), pc, dtype=np.int64)
  if len(shard) == 0:
    raise ValueError(f"No training pairs for process {pi} in {source!r}.")
  limit = limit_lengths(tokenized, shard, data_config.max_len,
                        data_config.long_pairs)
  logging.info(
      "%s (process %d/%d): %d pairs, %d longer than max_len=%d dropped, "
      "%d truncated.", source.description, pi, pc, limit.stats.seen,
      limit.stats.dropped, data_config.max_len, limit.stats.truncated)
  batches = PackedBatches(
      tokenized, limit.kept, rows=rows, max_len=data_config.max_len,
      eos_id=tok.eos_id, seed=data_config.seed,
      open_bins=data_config.num_packing_bins or rows,
      num_epochs=num_epochs, block_pairs=block_pairs)
  return batches, limit


def make_train_iterator(
    data_config, tok: tokenizer_lib.Tokenizer, batch_size: int, **kwargs
) -> PackedBatches:
  """Infinite iterator of packed host batches; has get_state()/set_state()."""
  batches, _ = make_train_dataset(data_config, tok, batch_size, **kwargs)
  return batches


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
  tokenized = token_cache.load_or_build(data_config, tok, source)
  stats = limit_lengths(tokenized, np.arange(len(pairs)), max_len,
                        "truncate").stats
  logging.info("%s: %d pairs, %d truncated to max_len=%d for evaluation.",
               source.description, stats.seen, stats.truncated, max_len)

  def make_row(index: int) -> dict[str, np.ndarray]:
    row = {"row_mask": np.int32(1), "index": np.int32(index)}
    for side, ids in zip(("src", "tgt"), tokenized.pair(index)):
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
