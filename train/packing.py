"""Packs (source, target) pairs into fixed-width rows, from flat id arrays.

    plan = pack(src_len, tgt_len, max_len, open_bins)    # where each pair goes
    rows = assemble(ids, pairs, plan, max_len, eos_id)    # the rows' arrays

`pack` decides, in the given pair order, a row and a column (one per side)
for every pair: best fit among `open_bins` open rows (the row it fits with
the fewest free tokens left); when it fits none, the fullest open row is
closed and a new one opened. `assemble` then writes every row of a plan in a
few vectorized NumPy gathers, in train/batches.py's layout.

Our own packer rather than Grain's FirstFitPackIterDataset: Grain packs per
element in Python through its iterator stack and flushes every bin when one
element fits none (about 13 batches/s of 16 x 128 with tokenization, and
lower efficiency at 16 bins); packing a whole block of lengths in one loop
over plain ints and gathering its rows with NumPy serves thousands of
batches a second (benchmarks/pipeline.py measures both).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class Plan:
  """Where each pair of a block goes: row, columns, segment id (1, 2, ...).

  All int64 [num_pairs]; num_rows rows are used, numbered from 0.
  """

  row: np.ndarray
  src_col: np.ndarray
  tgt_col: np.ndarray
  segment: np.ndarray
  num_rows: int


def pack(src_len: np.ndarray, tgt_len: np.ndarray, max_len: int,
         open_bins: int) -> Plan:
  """Best-fit packing of pairs with lengths <= max_len, in the given order."""
  n = len(src_len)
  row = np.empty(n, np.int64)
  src_col = np.empty(n, np.int64)
  tgt_col = np.empty(n, np.int64)
  bins: list[list[int]] = []  # open rows: [row id, src used, tgt used]
  num_rows = 0
  capacity = 2 * max_len
  for i, (s, t) in enumerate(zip(src_len.tolist(), tgt_len.tolist())):
    best, best_free = None, capacity + 1
    for b in bins:
      if b[1] + s <= max_len and b[2] + t <= max_len:
        free = capacity - b[1] - b[2]
        if free < best_free:
          best, best_free = b, free
    if best is None:
      if len(bins) >= open_bins:
        bins.remove(max(bins, key=lambda b: b[1] + b[2]))
      best = [num_rows, 0, 0]
      num_rows += 1
      bins.append(best)
    row[i], src_col[i], tgt_col[i] = best
    best[1] += s
    best[2] += t
  return Plan(row, src_col, tgt_col, _segments(row, src_col), num_rows)


def _segments(row: np.ndarray, col: np.ndarray) -> np.ndarray:
  """1-based order of each pair inside its row (by column)."""
  if not len(row):
    return np.zeros(0, np.int64)
  order = np.lexsort((col, row))
  sorted_rows = row[order]
  starts = np.flatnonzero(np.r_[True, sorted_rows[1:] != sorted_rows[:-1]])
  first = np.repeat(starts, np.diff(np.r_[starts, len(row)]))
  segment = np.empty(len(row), np.int64)
  segment[order] = np.arange(len(row)) - first + 1
  return segment


def _ragged_arange(lengths: np.ndarray) -> np.ndarray:
  """[0..l0), [0..l1), ... concatenated."""
  ends = np.cumsum(lengths)
  return np.arange(ends[-1] if len(ends) else 0) - np.repeat(ends - lengths, lengths)


def _write_side(ids: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
                row: np.ndarray, segment: np.ndarray, num_rows: int,
                max_len: int, eos_id: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(tokens, segment ids, positions), each int32 [num_rows, max_len].

  The pairs come sorted by (row, column), so the row-major order of the
  non-padding cells is the order of their tokens: one boolean-mask store per
  array instead of a scatter.
  """
  within = _ragged_arange(lengths)
  stream = ids[np.repeat(starts, lengths) + within]
  stream[np.cumsum(lengths) - 1] = eos_id  # truncated pairs end in eos too
  used = np.bincount(row, weights=lengths, minlength=num_rows)
  mask = np.arange(max_len) < used[:, None]
  tokens = np.zeros((num_rows, max_len), np.int32)
  tokens[mask] = stream
  segment_ids = np.zeros((num_rows, max_len), np.int32)
  segment_ids[mask] = np.repeat(segment, lengths)
  positions = np.zeros((num_rows, max_len), np.int32)
  positions[mask] = within
  return tokens, segment_ids, positions


def assemble(tokenized, pairs: np.ndarray, plan: Plan, max_len: int,
             eos_id: int) -> dict[str, np.ndarray]:
  """The rows of `plan` for `pairs` (indices into `tokenized`).

  Lengths are clipped to max_len (a longer pair keeps its first max_len - 1
  ids and eos). Returns train/batches.py's keys, int32 [plan.num_rows, max_len].
  """
  order = np.lexsort((plan.src_col, plan.row))  # columns rise with segments
  pairs, row, segment = pairs[order], plan.row[order], plan.segment[order]
  out = {}
  for side in ("src", "tgt"):
    offsets = getattr(tokenized, f"{side}_offsets")
    starts = offsets[pairs]
    lengths = np.minimum(offsets[pairs + 1] - starts, max_len)
    tokens, segment_ids, positions = _write_side(
        getattr(tokenized, f"{side}_ids"), starts, lengths, row, segment,
        plan.num_rows, max_len, eos_id)
    out[side] = tokens
    out[f"{side}_segment_ids"] = segment_ids
    out[f"{side}_positions"] = positions
  return out
