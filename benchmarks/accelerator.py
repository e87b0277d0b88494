"""One run on an accelerator host: the loop against its step, train.choose, base bf16 MFU.

    python -m benchmarks.accelerator --data_dir=DIR --out=FILE [--quick]

(``benchmarks/accelerator.sh`` installs the wheels first and calls this.)
Each part runs in its own subprocess under a time limit; a part that fails
or runs out of time is recorded with its error and the others still run.
One JSON object goes to ``--out`` (and stdout):

* ``loop``: ``benchmarks.loop`` at bible_es_en's config (its model, 8k
  vocabulary, 16 x 128 batches): the train step alone, the loop fed from
  memory and from the input pipeline, each without and with
  ``DevicePrefetch``; ratios loop / step.
* ``choose``: a short bible_es_en run (``python -m train``, 200 steps,
  no periodic BLEU), then the quickstart's step 4 timed:
  ``python -m train.choose --workdir=... --max_sentences=300
  --alphas=1.0,1.4 --beam_size=4 --test_split=test``.
* ``base_bf16``: ``benchmarks.training --presets=base --max_lens=256
  --tokens_per_step=65536 --dtype=bfloat16``: steps/s, target tokens/s and
  MFU against the bf16 peak (``peak_source`` says which).

``--quick`` runs the same parts reduced to a CPU's minutes (the `tiny` model,
a 1k vocabulary, 8 x 32 batches, a few steps, 8 validation verses and no
test pass): the form the tests run.
The full form is sized for <= 8 minutes on one H200.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

from benchmarks.run_all import json_lines

CONFIG = "experiments/configs/bible_es_en.py"

# (part, limit in seconds) of the full form; the sum stays under 8 minutes.
LIMITS = {"loop": 220, "train": 75, "choose": 90, "base_bf16": 75}
# The quick form's: a shared CPU runs it many times slower than it should.
QUICK_LIMITS = {"loop": 600, "train": 400, "choose": 300, "base_bf16": 300}


def commands(data_dir: str, workdir: str, out_dir: str, quick: bool
             ) -> dict[str, list[str]]:
  """Each part's command line (run from the project root)."""
  py = [sys.executable, "-m"]
  if quick:
    loop = ["--preset=tiny", "--vocab_size=1000", "--batch_size=8",
            "--max_len=32", "--num_batches=8", "--steps=60", "--rounds=1",
            "--feeds=memory"]
    train = ["--config.model_preset=tiny", "--config.model.d_model=32",
             "--config.model.d_ff=64", "--config.data.vocab_size=1000",
             "--config.batch_size=8", "--config.data.max_len=32",
             "--config.num_train_steps=20", "--config.log_every_steps=10",
             "--config.num_eval_batches=2"]
    # Validation only: the test split's 1,063 verses are the full form's.
    choose = ["--max_sentences=8", "--alphas=1.0", "--beam_size=2",
              "--max_extra_len=5"]
    base = ["--presets=tiny", "--max_lens=32", "--tokens_per_step=512",
            "--steps=2"]
  else:
    loop = ["--preset=", "--vocab_size=0", "--steps=300", "--rounds=1",
            "--feeds=memory,pipeline"]
    train = ["--config.num_train_steps=200"]
    choose = ["--max_sentences=300", "--alphas=1.0,1.4", "--beam_size=4",
              "--test_split=test"]
    base = ["--presets=base", "--max_lens=256", "--tokens_per_step=65536",
            "--steps=10"]
  return {
      "loop": py + ["benchmarks.loop", f"--config={CONFIG}",
                    f"--data_dir={data_dir}", "--prefetch=0,2",
                    f"--output={os.path.join(out_dir, 'loop.json')}"] + loop,
      "train": py + ["train", f"--config={CONFIG}", f"--workdir={workdir}",
                     f"--config.data.data_dir={data_dir}",
                     "--config.eval_bleu_every_steps=0",
                     "--config.long_run_steps=0"] + train,
      "choose": py + ["train.choose", f"--workdir={workdir}"] + choose,
      "base_bf16": py + ["benchmarks.training", "--dtype=bfloat16"] + base,
  }


def run_part(command: list[str], limit: float) -> dict:
  """Runs one command; its wall time, exit status, and output's tail."""
  start = time.perf_counter()
  try:
    proc = subprocess.run(command, capture_output=True, text=True,
                          timeout=limit, check=False)
  except subprocess.TimeoutExpired as e:
    return {"command": " ".join(command), "error": f"timed out after "
            f"{limit:g} s", "seconds": round(time.perf_counter() - start, 1),
            "stderr_tail": _tail(e.stderr)}
  out = {"command": " ".join(command), "returncode": proc.returncode,
         "seconds": round(time.perf_counter() - start, 1),
         "stdout": proc.stdout}
  if proc.returncode:
    out["error"] = f"exit status {proc.returncode}"
    out["stderr_tail"] = _tail(proc.stderr)
  return out


def _tail(text, lines: int = 15) -> str:
  if isinstance(text, bytes):
    text = text.decode(errors="replace")
  return "\n".join((text or "").splitlines()[-lines:])


def summarize_choose(result: dict) -> dict:
  """choose's seconds, its chosen flags and the test scores it printed."""
  text = result.pop("stdout", "")
  chosen = re.findall(r"^chosen: (.*)$", text, re.M)
  scores = re.findall(r"(BLEU|chrF2?)[ =:]+([0-9.]+)", text)
  return {**result, "chosen": chosen[-1] if chosen else None,
          "scores_printed": [f"{k} {v}" for k, v in scores][-4:],
          "stdout_tail": _tail(text, 8)}


def summarize_training(result: dict) -> dict:
  records = json_lines(result.pop("stdout", ""))
  keep = ("preset", "dtype", "steps_per_s", "tgt_tokens_per_s",
          "achieved_gflops", "peak_gflops", "peak_dtype", "peak_source",
          "mfu", "mfu_vs_measured_peak", "compile_s", "device_kind")
  return {**result, **({k: records[-1].get(k) for k in keep}
                       if records else {})}


def run(data_dir: str, out: str, quick: bool) -> dict:
  start = time.perf_counter()
  limits = QUICK_LIMITS if quick else LIMITS
  with tempfile.TemporaryDirectory(prefix="accelerator_") as tmp:
    cmds = commands(os.path.abspath(data_dir), os.path.join(tmp, "run"), tmp,
                    quick)
    record = {"benchmark": "accelerator", "mode": "quick" if quick else "full"}
    loop = run_part(cmds["loop"], limits["loop"])
    loop.pop("stdout", None)
    loop_json = os.path.join(tmp, "loop.json")
    if os.path.exists(loop_json):
      with open(loop_json, encoding="utf-8") as f:
        loop.update(json.load(f))
    record["loop"] = loop
    train = run_part(cmds["train"], limits["train"])
    train.pop("stdout", None)
    record["choose"] = {"train": train}
    if "error" not in train:
      record["choose"].update(summarize_choose(
          run_part(cmds["choose"], limits["choose"])))
    record["base_bf16"] = summarize_training(
        run_part(cmds["base_bf16"], limits["base_bf16"]))
  from benchmarks.common import machine  # pylint: disable=import-outside-toplevel
  record["machine"] = machine()
  record["wall_s"] = round(time.perf_counter() - start, 1)
  record["errors"] = [part for part, r in (("loop", record["loop"]),
                                           ("train", train),
                                           ("choose", record["choose"]),
                                           ("base_bf16", record["base_bf16"]))
                      if "error" in r]
  text = json.dumps(record, indent=1, sort_keys=True)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w", encoding="utf-8") as f:
    f.write(text + "\n")
  print(text, flush=True)
  return record


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", required=True,
                      help="tfds data_dir holding the built bible_es_en")
  parser.add_argument("--out", default="runs/accelerator.json",
                      help="where the JSON goes")
  parser.add_argument("--quick", action="store_true",
                      help="the reduced form for a CPU (tests)")
  args = parser.parse_args(argv)
  if not os.path.isdir(os.path.join(args.data_dir, "bible_es_en")):
    parser.error(f"--data_dir={args.data_dir}: no bible_es_en folder in it; "
                 "build the dataset where it can be (python -c 'import "
                 "train.datasets, tensorflow_datasets as tfds; "
                 "tfds.data_source(\"bible_es_en\", split=\"test\", "
                 "data_dir=DIR)') and copy the folder along")
  record = run(args.data_dir, args.out, args.quick)
  return 1 if record["errors"] else 0


if __name__ == "__main__":
  sys.exit(main())
