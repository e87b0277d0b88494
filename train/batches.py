"""The batch layout shared by the input pipeline, the steps and the runners.

A batch is a dict of np.int32 ``[rows, max_len]`` arrays (``BATCH_KEYS``):

  src, tgt              token ids; each pair ends with eos; pad = 0. ``tgt`` is
                        not shifted: the model shifts it right itself.
  src_segment_ids,      which packed pair a token belongs to: 1, 2, ... per
  tgt_segment_ids       row; 0 = padding.
  src_positions,        position inside its pair, restarting at 0 per pair
  tgt_positions         (0 on padding).

Training batches come from train/input_pipeline.py (rows packed by
train/packing.py from the cached ids of train/token_cache.py).
Evaluation batches add ``row_mask`` (``[rows]``, 1 = real row) and ``index``
(``[rows]``: the pair's index in the split, -1 for padding rows).

Also here: ``SyntheticBatches`` (a deterministic copy task in this layout, for
tests, smoke runs and benchmarks) and ``trim_padding``. Imports only numpy.
"""

from __future__ import annotations

import itertools

import numpy as np

BATCH_KEYS = ("src", "tgt", "src_segment_ids", "tgt_segment_ids",
              "src_positions", "tgt_positions")


def example_batch(rows: int = 1, max_len: int = 8) -> dict[str, np.ndarray]:
  """A batch of ones: shapes for init / eval_shape."""
  return {k: np.ones((rows, max_len), np.int32) for k in BATCH_KEYS}


def empty_eval_batch(rows: int, max_len: int) -> dict[str, np.ndarray]:
  """An all-padding eval batch: row_mask 0, index -1."""
  batch = {k: np.zeros((rows, max_len), np.int32) for k in BATCH_KEYS}
  batch["row_mask"] = np.zeros(rows, np.int32)
  batch["index"] = np.full(rows, -1, np.int32)
  return batch


def trim_padding(batch: dict[str, np.ndarray], multiple: int = 32
                 ) -> dict[str, np.ndarray]:
  """Drops all-padding trailing columns, keeping a multiple of ``multiple``.

  Eval rows hold one pair each (not packed), mostly padding at max_len; a
  few bucketed widths mean a few compilations and far less work.
  """
  used = max(int(np.max(np.nonzero(batch[k].any(axis=0))[0], initial=0)) + 1
             for k in ("src", "tgt"))
  width = min(batch["src"].shape[1], -(-used // multiple) * multiple)
  return {k: (v[:, :width] if v.ndim == 2 else v) for k, v in batch.items()}


class SyntheticBatches:
  """Deterministic packed batches of a copy task (tgt = src).

  Batch i depends only on (seed, i); each row holds up to two pairs. With
  ``process_count`` > 1 each process gets its own rows of the same global
  batch. get_state()/set_state() make it checkpointable like the pipeline.
  """

  def __init__(self, batch_size: int, max_len: int, vocab_size: int,
               seed: int = 0, process_index: int = 0, process_count: int = 1):
    self.batch_size, self.max_len, self.vocab_size = batch_size, max_len, vocab_size
    self.seed, self.index = seed, 0
    self.rows = slice(process_index * batch_size // process_count,
                      (process_index + 1) * batch_size // process_count)

  def get_state(self) -> dict:
    return {"index": self.index}

  def set_state(self, state: dict) -> None:
    self.index = int(state["index"])

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self.seed, self.index])
    self.index += 1
    out = {k: np.zeros((self.batch_size, self.max_len), np.int32)
           for k in BATCH_KEYS}
    for row in range(self.batch_size):
      start = 0
      for segment in (1, 2):
        length = int(rng.integers(3, max(4, self.max_len // 2)))
        if start + length > self.max_len:
          break
        pair = np.append(rng.integers(2, self.vocab_size, length - 1), 1)
        span = slice(start, start + length)
        for side in ("src", "tgt"):
          out[side][row, span] = pair
          out[f"{side}_segment_ids"][row, span] = segment
          out[f"{side}_positions"][row, span] = np.arange(length)
        start += length
    return {k: v[self.rows] for k, v in out.items()}


class SyntheticEval:
  """Two synthetic batches as a stand-in validation split (``EvalData``'s API)."""

  def __init__(self, batch_size: int, max_len: int, vocab_size: int,
               seed: int, process_index: int = 0, process_count: int = 1):
    self._make = lambda: SyntheticBatches(batch_size, max_len, vocab_size,
                                          seed, process_index, process_count)

  def batches(self):
    return itertools.islice(self._make(), len(self))

  def __len__(self):
    return 2
