"""Batches placed on the devices ahead of the step that takes them.

``DevicePrefetch(train_iter, runner.place_batch, size=2)`` reads and places
(``NamedSharding`` of the runner's mesh: ``runner.place_batch``) the next
``size`` batches in a background thread while the devices run the current
step, so the loop's thread only dispatches steps:

    train_iter = DevicePrefetch(train_iter, runner.place_batch)
    state, metrics = runner.train_step(state, next(train_iter), rng)
    ...
    ckpt.save(step, state, train_iter, ...)   # the state after the last
                                             # batch taken, not the read-ahead
    train_iter.close()

Exact resume is kept: ``get_state()`` is the wrapped iterator's state as it
was right after the batch ``__next__`` last returned (recorded with each
batch), so a checkpoint never skips the batches read ahead; ``set_state``
drops the read-ahead and restarts from the given state.

Why a thread of our own rather than ``grain.experimental.device_put``: that
wraps a Grain ``IterDataset`` (not any iterator with get_state, such as the
synthetic and in-memory feeds), places with one sharding per array rather
than through the runner (whose ``place_batch`` also builds global batches
across hosts with ``make_array_from_process_local_data``), and its iterator
state would be the read-ahead's.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterator

_END = object()


class DevicePrefetch:
  """An iterator of placed batches read ``size`` ahead by a background thread."""

  def __init__(self, iterator: Iterator, place: Callable[[Any], Any],
               size: int = 2):
    if size < 1:
      raise ValueError(f"DevicePrefetch(size={size}): read at least 1 ahead")
    self.iterator = iterator
    self.place = place
    self.size = size
    self._state = self._inner_state()
    self._start()

  def _inner_state(self):
    get = getattr(self.iterator, "get_state", None)
    return get() if get is not None else None

  def _start(self) -> None:
    self._queue: queue.Queue = queue.Queue(maxsize=self.size)
    self._stop = threading.Event()
    self._done = False
    self._thread = threading.Thread(target=self._fill, daemon=True,
                                    name="device-prefetch")
    self._thread.start()

  def _fill(self) -> None:
    """Thread: next batch, the iterator's state after it, placed -> queue."""
    try:
      while not self._stop.is_set():
        try:
          batch = next(self.iterator)
        except StopIteration:
          self._put((_END, None))
          return
        item = (self.place(batch), self._inner_state())
        self._put(item)
    except BaseException as e:  # pylint: disable=broad-except
      self._put((e, None))      # raised in the caller's thread by __next__

  def _put(self, item) -> None:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return
      except queue.Full:
        continue

  def __iter__(self):
    return self

  def __next__(self):
    if self._done:
      raise StopIteration
    placed, state = self._queue.get()
    if placed is _END:
      self._done = True
      raise StopIteration
    if isinstance(placed, BaseException):
      self._done = True
      raise placed
    self._state = state
    return placed

  def get_state(self):
    """The wrapped iterator's state after the last batch returned."""
    return self._state

  def set_state(self, state) -> None:
    """Drops the read-ahead; the next batch is the one after ``state``."""
    self.close()
    self.iterator.set_state(state)
    self._state = state
    self._start()

  def close(self) -> None:
    """Stops the thread (the batches read ahead are dropped)."""
    self._stop.set()
    while self._thread.is_alive():
      try:   # unblock a put waiting on a full queue
        self._queue.get(timeout=0.05)
      except queue.Empty:
        pass
    self._done = True

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
