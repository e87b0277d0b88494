"""Metric writers: TensorBoard (tensorboardX, no TensorFlow), JSON lines, console.

``MetricWriter(workdir, start_step=step)`` writes every scalar to
``<workdir>/tensorboard/`` and appends ``{"step": ..., "time": ..., **scalars}``
to ``<workdir>/metrics.jsonl``. Only process 0 writes (``enabled``).

The log stays readable line by line after any crash: a line cut short (a
full disk, a kill) is completed to a line boundary before the next record,
and ``read_metrics`` skips a damaged line, naming it. Each step is logged
once: a run resumed at ``start_step`` moves the records of later steps (the
steps it will train again, or that --checkpoint went back past) to
``metrics.superseded.jsonl``, never deleting them.
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
SUPERSEDED_FILE = "metrics.superseded.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricWriter:
  """Scalars to TensorBoard event files and a JSON-lines log."""

  def __init__(self, workdir, enabled: bool = True,
               start_step: int | None = None):
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    if not enabled:
      return
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._tb = SummaryWriter(str(workdir / TENSORBOARD_DIR), flush_secs=30)
    path = workdir / METRICS_FILE
    if start_step is not None:
      _supersede_after(path, start_step)
    _end_line(path)
    self._jsonl = open(path, "a", encoding="utf-8")

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


def _end_line(path) -> None:
  """Completes a file to a line boundary before anything is appended: a
  record cut short stays a damaged line of its own, the next one is whole."""
  with open(path, "ab+") as f:
    if f.seek(0, 2) and (f.seek(-1, 2), f.read(1))[1] != b"\n":
      f.write(b"\n")


def _read_lines(path) -> list[str]:
  with open(path, encoding="utf-8", errors="replace") as f:
    return f.read().splitlines()


def _parse(lines) -> list[tuple[str, dict | None]]:
  """(line, record or None where the line is damaged) for each line."""
  out = []
  for line in lines:
    try:
      record = json.loads(line)
    except ValueError:
      record = None
    out.append((line, record if isinstance(record, dict) and "step" in record
                else None))
  return out


def _supersede_after(path: epath.Path, step: int) -> None:
  """Moves the records of steps after ``step`` to metrics.superseded.jsonl
  (appended), rewriting metrics.jsonl atomically; nothing if there are none."""
  if not path.exists():
    return
  lines = _read_lines(path)
  parsed = _parse(lines)
  later = [line for line, r in parsed if r is not None and r["step"] > step]
  if not later:
    return
  superseded = path.parent / SUPERSEDED_FILE
  _end_line(superseded)
  with open(superseded, "a", encoding="utf-8") as f:
    f.write("".join(line + "\n" for line in later))
  kept = [line for line, r in parsed if r is None or r["step"] <= step]
  tmp = path.parent / (METRICS_FILE + ".tmp")
  tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
  tmp.replace(path)


def read_metrics(workdir) -> list[dict]:
  """All records of ``metrics.jsonl`` (for tests and notebooks); a damaged
  line (cut short by a crash) is skipped with a warning naming it."""
  path = epath.Path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  lines = _read_lines(path)
  records = []
  for number, (line, record) in enumerate(_parse(lines), start=1):
    if record is not None:
      records.append(record)
    elif line.strip():
      print(f"warning: {path} line {number} is damaged (not a whole JSON "
            f"record): skipped: {line[:80]!r}", file=sys.stderr)
  return records


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
