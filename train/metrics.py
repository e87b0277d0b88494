"""Metric writers: TensorBoard (tensorboardX, no TensorFlow), JSON lines, console.

``MetricWriter(workdir)`` writes every scalar to ``<workdir>/tensorboard/``
and appends ``{"step": ..., "time": ..., **scalars}`` to
``<workdir>/metrics.jsonl``. Only process 0 writes (``enabled``).
``progress_line`` formats the console line the trainer prints.
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Mapping

from etils import epath

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricWriter:
  """Scalars to TensorBoard event files and a JSON-lines log."""

  def __init__(self, workdir, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    if not enabled:
      return
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._tb = SummaryWriter(str(workdir / TENSORBOARD_DIR), flush_secs=30)
    self._jsonl = open(workdir / METRICS_FILE, "a", encoding="utf-8")

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    numbers = {k: _number(v) for k, v in scalars.items()}
    for key, value in numbers.items():
      if value is not None:
        self._tb.add_scalar(key, value, step)  # NaN / Inf as floats
    # JSON has no NaN / Inf: write those as strings.
    clean = {k: v if v is None or math.isfinite(v) else str(v)
             for k, v in numbers.items()}
    self._jsonl.write(json.dumps({"step": int(step), "time": time.time(),
                                  **clean}) + "\n")
    self._jsonl.flush()

  def close(self) -> None:
    """Closes the files; a failure to write their tail (a full disk) is one
    warning line, not an error: the metrics written so far are kept."""
    if self.enabled:
      self.enabled = False
      try:
        self._tb.close()
        self._jsonl.close()
      except OSError as e:
        print(f"warning: could not finish writing the metrics files ({e})",
              file=sys.stderr, flush=True)


def _number(value) -> float | None:
  try:
    return float(value)
  except (TypeError, ValueError):
    return None


def read_metrics(workdir) -> list[dict]:
  """All records of ``metrics.jsonl`` (for tests and notebooks)."""
  path = epath.Path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line]


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


def progress_line(step: int, total: int, scalars: Mapping[str, float],
                  eta_seconds: float) -> str:
  """'step 1200/2000 | loss 3.412 | nll ... | lr 1.2e-03 | 1,400 tgt tok/s | ETA 4:10'."""
  width = len(str(total))
  parts = [f"step {step:>{width}}/{total}"]
  for key, fmt in (("train_loss", "loss {:.3f}"), ("train_nll", "nll {:.3f}"),
                   ("train_accuracy", "acc {:.3f}"),
                   ("learning_rate", "lr {:.2e}"),
                   ("target_tokens_per_sec", "{:,.0f} tgt tok/s"),
                   ("steps_per_sec", "{:.2f} steps/s")):
    if key in scalars:
      parts.append(fmt.format(scalars[key]))
  parts.append(f"ETA {format_duration(eta_seconds)}")
  return " | ".join(parts)
