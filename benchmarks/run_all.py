"""Every benchmark in one command; writes benchmarks/results/<YYYY-MM-DD>.json.

    python -m benchmarks.run_all [--quick] [--skip decode,pipeline] [--out PATH]
        [--workdir runs/bible_es_en]

Runs, in order: ``peak`` (float32 and bf16 matmul GFLOP/s), ``train`` (tiny /
small / base x max_len 64 / 128 / 256, float32, plus ``small`` at 128 in
bfloat16 for the bf16/f32 ratio), ``decode`` (if ``benchmarks/decode.py``
exists) and ``pipeline``. The train benchmark runs in-process through
``benchmarks.training.run``; decode and pipeline run as subprocesses and their
JSON lines are collected. A benchmark that fails is recorded with its error and
the others still run. --workdir: the trained run that ``decode`` loads
(without it decode uses random params, a worst case). The result file holds the machine, the load average
before and after, and every record.

--quick: small only at 128 (float32 and bf16), for a check in about a minute.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _load() -> list[float] | None:
  return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def json_lines(text: str) -> list[dict]:
  """The JSON records a benchmark printed, one a line (other lines skipped)."""
  records = []
  for line in text.splitlines():
    line = line.strip()
    if line.startswith("{"):
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        pass
  return records


def _subprocess(name: str, args: list[str], timeout: float) -> dict:
  """Run a benchmark script; its JSON lines become the records."""
  start = time.perf_counter()
  try:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, check=False)
  except subprocess.TimeoutExpired:
    return {"name": name, "error": f"timed out after {timeout} s"}
  sys.stdout.write(proc.stdout)
  result = {"name": name, "seconds": round(time.perf_counter() - start, 1),
            "records": json_lines(proc.stdout)}
  if proc.returncode:
    result["error"] = proc.stderr.strip().splitlines()[-5:]
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--skip", default="",
                      help="comma-separated: peak,train,decode,pipeline")
  parser.add_argument("--out", default="")
  parser.add_argument("--workdir", default="",
                      help="trained run for the decode benchmark")
  parser.add_argument("--timeout", type=float, default=1800,
                      help="seconds per subprocess benchmark")
  args = parser.parse_args()
  skip = set(filter(None, args.skip.split(",")))

  from benchmarks import common, peak, training  # pylint: disable=import-outside-toplevel

  results = {"date": datetime.date.today().isoformat(),
             "machine": common.machine(), "cpu_count": os.cpu_count(),
             "load_avg_start": _load(), "benchmarks": []}
  peak_f32 = 0.0
  if "peak" not in skip:
    gflops = peak.run()
    peak_f32 = gflops["float32"]
    results["benchmarks"].append({"name": "peak", "records": [
        {"dtype": k, "gflops": v} for k, v in gflops.items()]})
  if "train" not in skip:
    try:
      if args.quick:
        records = training.run(["small"], [128], peak_gflops=peak_f32)
      else:
        records = training.run(peak_gflops=peak_f32)
      records += training.run(["small"], [128], dtype="bfloat16",
                              peak_gflops=peak_f32)
      f32 = next((r for r in records if r.get("preset") == "small"
                  and r.get("max_len") == 128 and r.get("dtype") == "float32"
                  and "error" not in r), None)
      bf16 = records[-1]
      summary = {}
      if f32 and "error" not in bf16:
        summary["bf16_over_f32_tokens_per_s"] = round(
            bf16["tgt_tokens_per_s"] / f32["tgt_tokens_per_s"], 3)
      results["benchmarks"].append({"name": "train", "records": records,
                                    **summary})
    except Exception as e:  # pylint: disable=broad-except
      results["benchmarks"].append({"name": "train", "error": repr(e)})
  if "decode" not in skip and (ROOT / "benchmarks" / "decode.py").exists():
    results["benchmarks"].append(
        _subprocess("decode", ["-m", "benchmarks.decode"] + (
            [f"--workdir={args.workdir}"] if args.workdir else []),
                    args.timeout))
  if "pipeline" not in skip and (ROOT / "benchmarks" / "pipeline.py").exists():
    results["benchmarks"].append(
        _subprocess("pipeline", ["-m", "benchmarks.pipeline"], args.timeout))
  results["load_avg_end"] = _load()

  out = pathlib.Path(args.out) if args.out else (
      ROOT / "benchmarks" / "results" / f"{results['date']}.json")
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
