"""The loop every search shares: where it runs, its segments over growing
caches, and the rows it drops once they have ended.

A search is given to the loop as a ``Search`` (its first state, a jitted
segment of steps, which rows have ended, what it returns). Two modes:

  * "host" (the default on a CPU): ``run_segments`` runs the steps in
    jitted segments over caches that grow to the filled length
    (``cache_lengths``); between segments the host reads which rows have
    ended, stops the batch when all have, and drops ended rows
    (``compacted_rows``). Fastest on a CPU, where a step costs what its
    positions and rows cost and a host read costs ~nothing.
  * "device" (the default elsewhere): ``run_one_loop`` runs the whole
    search as one ``lax.while_loop`` over a cache of the batch's limit, in
    one program with the encoder (the search's ``*_on_device`` jit): no
    host read inside a search, one compiled program per batch shape and
    method, the results read once (as Flax's examples/wmt and T5X decode).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .cache import _grow_cache, cache_lengths

MODES = ("auto", "host", "device")


def search_mode(mode: str = "auto") -> str:
  """"host" or "device" (see the module docstring); "auto" is "device"
  wherever ``jax.default_backend()`` is not the CPU."""
  if mode not in MODES:
    raise ValueError(f"mode={mode!r}: choose one of {', '.join(MODES)} "
                     "(auto: device on an accelerator, host on a CPU)")
  if mode == "auto":
    return "host" if jax.default_backend() == "cpu" else "device"
  return mode


class Search(NamedTuple):
  """A search as the shared loop drives it.

  start(cache_len) -> state, a dict with a scalar "step" and a "cache";
  segment(state, src, stop) -> state, run to step ``stop`` (int32 scalar)
  or the end of its cache's room, or fewer steps if every row ends;
  rows_done(state) -> bool [rows]: the rows whose search has ended (their
  state no longer changes); outputs: the state's entries returned, each
  [batch, ...]; beam_size: the state's rows per sentence of src.
  """
  start: Callable
  segment: Callable
  rows_done: Callable
  outputs: tuple[str, ...]
  beam_size: int = 1


def run_one_loop(search: Search, src, max_decode_len: int) -> dict:
  """The search in one segment over a cache of the whole limit:
  {name: [batch, ...]}. Traceable: nothing is read on the host."""
  state = search.start(max_decode_len)
  state = search.segment(state, src, jnp.int32(max_decode_len))
  return {k: state[k] for k in search.outputs}


# Between segments, rows whose search has ended are dropped once at most
# half the rows are still decoding: the batch shrinks by halves while it
# stays >= a quarter of its first size (rounded up), so a search compiles at
# most three batch sizes per cache length (each size is its own program).
# Only in a single process: a multi-host search's row flags and outputs
# stay where they are (its scalar "all ended?" is all the host reads).
_MIN_ROWS_DIVISOR = 4
# With compaction, a cache length's steps run in segments of at most this
# many steps, the host checking for ended rows after each (one sync and a
# segment launch: ~1% of 8 steps of 64 rows here); the segment's stop is a
# traced argument, so they share the cache length's program. The rows that
# end early in a batch stop costing within 8 steps, not at the next growth
# of the cache (16, 32, 64, ...), as CTranslate2 drops them at every step.
COMPACT_EVERY = 8


def compacted_rows(alive: int, rows: int, first_rows: int) -> int:
  """The batch size the next segment runs at: ``rows`` halved while the
  ``alive`` rows still fit and the size stays >= first_rows / 4."""
  least = max(1, -(-first_rows // _MIN_ROWS_DIVISOR))
  while rows // 2 >= max(alive, 1) and rows // 2 >= least:
    rows //= 2
  return rows


@functools.partial(jax.jit, static_argnames=("beam_size",))
def _take_rows(state, src, keep, *, beam_size: int):
  """The state and src of the sentences ``keep`` (int32 [n], in order).

  Leaves lead with the sentences ([batch, ...]) or with their beams
  ([batch * beam_size, ...], row-major); the scalar step is shared.
  """
  batch = src.shape[0]
  flat = (keep[:, None] * beam_size + jnp.arange(beam_size)).reshape(-1)

  def take(x):
    if x.ndim == 0:
      return x
    if x.shape[0] == batch:
      return x[keep]
    if x.shape[0] == batch * beam_size:
      return x[flat]
    raise ValueError(f"a search state leaf of shape {x.shape} leads with "
                     f"neither {batch} sentences nor their beams")
  return jax.tree_util.tree_map(take, state), src[keep]



def _put_rows(full, part, rows, batch: int):
  """Host copies: full (dict of numpy [batch, ...], or None) with its rows
  ``rows`` set from part (arrays [len(rows), ...])."""
  part = {k: np.asarray(x) for k, x in part.items()}
  if full is None:
    full = {k: np.zeros((batch,) + x.shape[1:], x.dtype)
            for k, x in part.items()}
  for k, x in part.items():
    full[k][rows] = x
  return full


class _Rows:
  """Which src row each row of a shrinking state holds, and the outputs of
  the rows dropped so far (host copies)."""

  def __init__(self, search: Search, batch: int):
    self.search, self.batch = search, batch
    self.rows = np.arange(batch)   # the src row of each row of state
    self.full = None               # outputs of rows dropped so far

  def compact(self, state, src, done: np.ndarray):
    """(state, src) without the ended rows where at most half decode
    (``compacted_rows``); ended rows pad the batch to its size."""
    alive = int((~done).sum())
    size = compacted_rows(alive, len(self.rows), self.batch)
    if size == len(self.rows):
      return state, src
    self.full = _put_rows(self.full, self._outputs(state), self.rows,
                          self.batch)
    ended = np.flatnonzero(done)[:size - alive]  # padding, if any
    keep = np.sort(np.concatenate([np.flatnonzero(~done), ended]))
    self.rows = self.rows[keep]
    return _take_rows(state, src, keep.astype(np.int32),
                      beam_size=self.search.beam_size)

  def gathered(self, state) -> dict:
    """{name: [batch, ...]}: state's outputs, with the rows dropped earlier
    put back in src's row order (a new array on the default device)."""
    last = self._outputs(state)
    if self.full is None:
      return last
    return {k: jnp.asarray(x) for k, x in
            _put_rows(self.full, last, self.rows, self.batch).items()}

  def _outputs(self, state) -> dict:
    return {k: state[k] for k in self.search.outputs}


def check_compact_every(compact_every: int) -> None:
  if compact_every < 0:
    raise ValueError(f"compact_every must be >= 0, got {compact_every}")


def run_segments(search: Search, src, max_decode_len: int, grow: bool,
                 compact: bool, compact_every: int = COMPACT_EVERY) -> dict:
  """Runs a search segment by segment over growing caches (host mode).

  Between segments the host reads ``search.rows_done`` (one sync a
  segment), grows the caches and, with ``compact``, drops ended rows
  (``compacted_rows``): a step then costs the rows still decoding, not the
  batch. With ``compact`` a cache length's steps run in segments of
  ``compact_every`` steps (0: one segment per cache length). Returns
  {name: [batch, ...]} of ``search.outputs`` in src's row order; where rows
  were dropped, each row's last state is gathered on the host (where a
  multi-host search's replicated outputs are read anyway).
  """
  lengths = cache_lengths(max_decode_len, grow)
  state, step = search.start(lengths[0]), 0
  # Under an outer jax.jit nothing can be read between segments: one
  # segment per cache length, which works while there is only one.
  traced = isinstance(state["step"], jax.core.Tracer)
  if traced and len(lengths) > 1:
    raise ValueError("a search over growing caches decides between its "
                     "segments on the host; under jax.jit pass "
                     "grow_cache=False (or mode='device')")
  compact = compact and grow and not traced and jax.process_count() == 1
  every = compact_every if compact else 0
  rows = _Rows(search, src.shape[0])
  for i, length in enumerate(lengths):
    if i:
      state = dict(state, cache=_grow_cache(state["cache"], length))
    while step < length:
      step = min(length, step + every) if every else length
      state = search.segment(state, src, np.int32(step))
      if step >= max_decode_len:  # every row has reached its limit
        break
      done = search.rows_done(state)
      if compact:
        done = np.asarray(done)
      if bool(done.all()):
        return rows.gathered(state)
      if compact:
        state, src = rows.compact(state, src, done)
  return rows.gathered(state)
