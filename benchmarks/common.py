"""Shared by the benchmarks: timing, JSON-lines output, a short table."""

from __future__ import annotations

import json
import platform
import statistics
import time
from typing import Any, Callable

import jax


def median_seconds(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
  """Median wall time of fn() over `repeats` runs, after `warmup` runs.

  fn must block until its work is done (jax.block_until_ready).
  """
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def device_counts(parser, text: str) -> list[int]:
  """A --devices value ("1,2") as counts; parser.error (exit 2) if malformed."""
  try:
    counts = [int(n) for n in text.split(",")]
  except ValueError:
    parser.error(f"--devices={text}: comma-separated counts, e.g. 1,2")
  if min(counts) < 1:
    parser.error(f"--devices: counts >= 1, got {counts}")
  return counts


def machine() -> dict[str, Any]:
  return {
      "platform": jax.devices()[0].platform,
      "device_kind": jax.devices()[0].device_kind,
      "num_devices": jax.device_count(),
      "cpu": platform.processor() or platform.machine(),
      "jax": jax.__version__,
  }


def emit(record: dict[str, Any]) -> dict[str, Any]:
  print(json.dumps(record, sort_keys=True), flush=True)
  return record


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
  cells = [[str(r.get(c, "")) for c in columns] for r in rows]
  widths = [max([len(c)] + [len(row[i]) for row in cells])
            for i, c in enumerate(columns)]
  line = lambda values: "  ".join(v.rjust(w) for v, w in zip(values, widths))
  return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])
