"""When the training loop stops early: SIGTERM (preemption), Ctrl-C, or the
wall time.

``StopRequest`` is a context manager that catches SIGTERM and SIGINT (a
second Ctrl-C stops at once: ``train.interrupts``) while the loop
runs; ``end(step, total, at_log_step)`` tells the loop whether this step is
its last and why (``DONE``, ``SIGNAL``, ``BUDGET``). ``max_minutes`` is a
safety limit: a run's length is its step count (fixed beforehand, with a
budget by ``train.plan``), and the wall-time stop only fires when the
machine runs slower than planned.
"""

from __future__ import annotations

import signal
import time

import jax
import numpy as np

from train import interrupts

# Why a step is the loop's last ("" while it goes on).
DONE, SIGNAL, BUDGET = "done", "signal", "budget"


class StopRequest:
  """SIGTERM / Ctrl-C or the wall-time budget -> finish the step, save, exit."""

  def __init__(self, max_minutes: float, start_time: float):
    self.max_minutes = max_minutes
    self.budget = max_minutes * 60 if max_minutes > 0 else float("inf")
    self.start_time = start_time
    # Seconds kept back for what follows the last step (the final
    # evaluation): the budget is the launch's wall time, the end included.
    self.reserve = 0.0
    self.signalled = ""
    self._previous = None

  def __enter__(self):
    try:
      self._previous = {s: signal.signal(s, self._handle)
                        for s in interrupts.SIGNALS}
    except ValueError:  # not the main thread
      self._previous = None
    return self

  def __exit__(self, *exc):
    for s, previous in (self._previous or {}).items():
      signal.signal(s, previous)

  def _handle(self, signum, frame):
    del frame
    interrupts.on_signal(signum, bool(self.signalled))
    self.signalled = f"signal {signal.Signals(signum).name}"

  def seconds_left(self) -> float:
    return self.budget - (time.time() - self.start_time)

  def requested(self, at_log_step: bool) -> bool:
    """Whether to stop now; every process agrees (checked at log steps)."""
    want = bool(self.signalled) or self.seconds_left() <= self.reserve
    if jax.process_count() == 1:
      return want
    if not at_log_step:
      return False
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return bool(np.any(multihost_utils.process_allgather(
        np.asarray(want, np.int32))))

  def end(self, step: int, total: int, at_log_step: bool) -> str:
    """DONE at the last step, SIGNAL / BUDGET on a stop request, else ""."""
    if step >= total:
      return DONE
    if not self.requested(at_log_step):
      return ""
    return SIGNAL if self.signalled else BUDGET

  def message(self, step: int, end: str) -> str:
    """The console line of a run stopped before its last step ("" if none)."""
    if end == SIGNAL:
      return f"Stopping at step {step} on {self.signalled}; checkpoint saved"
    if end == BUDGET:
      return (f"Stopping at step {step}: wall-time budget of "
              f"{self.max_minutes:g} min used")
    return ""
