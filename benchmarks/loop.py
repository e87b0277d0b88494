"""The training loop against its own step: how much the loop costs beyond the step.

    python -m benchmarks.loop [--config experiments/configs/bible_es_en.py]
        [--preset tiny] [--vocab_size 1000] [--data_dir DIR] [--steps 400]
        [--batch_size 0] [--max_len 0] [--rounds 2] [--feeds memory,pipeline] [--prefetch 0,2] [--profile]

On one config (``--config``, with ``--preset`` and ``--vocab_size`` applied;
``--preset ""`` keeps the config's model), alternating rounds in one process:

* ``step_alone``: the trainer's own jitted, state-donating train step
  (``train.trainer.make_runner``) on one real batch placed on the device once,
  blocked on every step: ``benchmarks.training``'s measurement, on this
  config's optimizer (the moving average of params included) and batch.
* ``loop_memory``: ``train.trainer.train_and_evaluate`` (the whole
  ``python -m train`` loop: placement, metrics, logging at the config's
  ``log_every_steps``, TensorBoard and metrics.jsonl) fed from an in-memory
  cycle of real batches drawn from the input pipeline before timing: the
  loop without the input pipeline's cost.
* ``loop_pipeline``: the same loop reading the real input pipeline (what
  ``python -m train`` does): bounded by the pipeline's batches/s.
* ``loop_<feed>_prefetch<n>`` (``--prefetch``): the same with
  ``config.device_prefetch=n`` (``train.prefetch.DevicePrefetch``: n batches
  placed ahead by a background thread; the trainer's default is 2);
  ``loop_<feed>`` alone is ``device_prefetch=0``.

Loop steps/s are read from the run's own metrics.jsonl: (steps between the
second and the last log record) / (seconds between them), so compilation,
the first log interval, the final evaluation and the final checkpoint are
not counted (periodic evaluation, BLEU and checkpoints are off:
``eval_every_steps``, ``checkpoint_every_steps`` > ``--steps``). The JSON
gives the medians over rounds and ``ratio_<variant>`` = loop / step alone.
``--profile`` adds one cProfile'd memory-fed run per ``--prefetch`` value
and reports the milliseconds per step of the loop's pieces
(``loop_pieces_ms_per_step``; cumulative, so a piece that waits for the
device counts that wait).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from unittest import mock

import numpy as np

GOAL_PRESET = "tiny"       # the default: a step fast enough that the loop shows
GOAL_VOCAB = 1000


class MemoryBatches:
  """Cycles over host batches held in memory; a checkpointable iterator."""

  def __init__(self, batches: list[dict[str, np.ndarray]]):
    self.batches = batches
    self.index = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = self.batches[self.index % len(self.batches)]
    self.index += 1
    return batch

  def get_state(self) -> dict:
    return {"index": self.index}

  def set_state(self, state: dict) -> None:
    self.index = int(state["index"])


def make_config(path: str, preset: str, vocab_size: int, data_dir: str,
                batch_size: int = 0, max_len: int = 0):
  """The experiment config of ``path`` with the benchmark's overrides
  (0 / "" keeps the config's)."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  if preset:  # the preset's own shape, not the config's narrowing
    config.model_preset = preset
    config.model.d_model = None
    config.model.d_ff = None
  if vocab_size:
    config.data.vocab_size = vocab_size
  if data_dir:
    config.data.data_dir = data_dir
  if batch_size:
    config.batch_size = batch_size
  if max_len:
    config.data.max_len = max_len
  return config


def loop_config(config, steps: int, prefetch: int = 0):
  """A copy that trains ``steps`` steps with no periodic eval or checkpoint,
  ``prefetch`` batches placed ahead (config.device_prefetch)."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  c = ml_collections.ConfigDict(config.to_dict())
  c.device_prefetch = prefetch
  c.num_train_steps = steps
  c.max_minutes = 0.0
  c.long_run_steps = 0
  c.eval_every_steps = 10 * steps
  c.checkpoint_every_steps = 10 * steps
  c.eval_bleu_every_steps = 0
  c.num_eval_batches = 1       # the final evaluation (not timed) stays short
  return c


def steady_steps_per_s(records: list[dict]) -> float:
  """Steps/s between the second and the last training log record."""
  logs = [r for r in records if "steps_per_sec" in r]
  if len(logs) < 3:
    raise ValueError(f"too few log records ({len(logs)}) to time the loop: "
                     "raise --steps above 3 x log_every_steps")
  first, last = logs[1], logs[-1]
  return (last["step"] - first["step"]) / (last["time"] - first["time"])


def time_step_alone(config, model_config, batch, steps: int) -> dict:
  """The trainer's jitted step on one placed batch, blocked every step."""
  import jax  # pylint: disable=import-outside-toplevel
  from train import trainer  # pylint: disable=import-outside-toplevel
  runner = trainer.make_runner(config, model_config)
  state = runner.init_state(jax.random.key(0))
  placed = runner.place_batch(batch)
  rng = jax.random.key(1)
  for _ in range(3):   # compile, warm up
    state, metrics = runner.train_step(state, placed, rng)
    jax.block_until_ready((state, metrics))
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = runner.train_step(state, placed, rng)
    jax.block_until_ready((state, metrics))
  return {"steps_per_s": steps / (time.perf_counter() - start)}


def time_loop(config, base_workdir: str, batches, steps: int,
              profile: bool = False, prefetch: int = 0) -> dict:
  """One ``train_and_evaluate`` run; steps/s from its metrics.jsonl.

  batches: a list (the in-memory feed) or None (the input pipeline);
  prefetch: batches placed ahead by ``DevicePrefetch`` (0: none).
  """
  from train import input_pipeline, trainer  # pylint: disable=import-outside-toplevel
  from train.metrics import read_metrics  # pylint: disable=import-outside-toplevel
  workdir = tempfile.mkdtemp(dir=base_workdir)
  shutil.copytree(os.path.join(base_workdir, "tokenizer"),
                  os.path.join(workdir, "tokenizer"))
  patches = contextlib.ExitStack()
  if batches is not None:
    patches.enter_context(mock.patch.object(
        input_pipeline, "make_train_iterator",
        lambda *a, **k: MemoryBatches(batches)))
  profiler = cProfile.Profile() if profile else None
  with patches, contextlib.redirect_stdout(io.StringIO()):
    if profiler:
      profiler.enable()
    trainer.train_and_evaluate(loop_config(config, steps, prefetch), workdir)
    if profiler:
      profiler.disable()
  records = read_metrics(workdir)
  shutil.rmtree(workdir, ignore_errors=True)
  out = {"steps_per_s": steady_steps_per_s(records)}
  if profiler:
    out["pieces"] = loop_pieces(profiler, steps)
  return out


# (label, function name, file name ending): the loop's pieces, as cProfile
# names them. Cumulative seconds overlap where one calls another.
PIECES = (
    ("next(train_iter)", "__next__", ""),
    ("runner.place_batch", "place_batch", "sharding.py"),
    ("runner.train_step (dispatch)", "train_step", "sharding.py"),
    ("metrics.add (waits for step n-1)", "add", "periodic.py"),
    ("metrics.flush (fetch, at log steps)", "flush", "periodic.py"),
    ("writer.write (logging)", "write", "metrics.py"),
    ("stop.requested", "requested", "stop.py"),
)


def loop_pieces(profiler: cProfile.Profile, steps: int) -> dict[str, float]:
  """Milliseconds per step of each piece of the loop (cumulative time)."""
  stats = pstats.Stats(profiler).stats
  out = {}
  for label, name, file_end in PIECES:
    total = 0.0
    for (filename, _, funcname), (_, _, _, cumtime, _) in stats.items():
      if funcname == name and filename.endswith(file_end) and (
          file_end or "train" not in filename):
        total += cumtime
    out[label] = round(1000 * total / steps, 3)
  loop = [v[3] for k, v in stats.items() if k[2] == "train_and_evaluate"]
  out["train_and_evaluate (whole run)"] = round(1000 * max(loop) / steps, 3)
  return out


def prepare(config, base_workdir: str, num_batches: int):
  """(model config, real host batches) of the config, tokenizer in base_workdir."""
  from train import input_pipeline, trainer  # pylint: disable=import-outside-toplevel
  tok = input_pipeline.train_or_load_tokenizer(config.data, base_workdir)
  model_config = trainer.model_config_for(config, tok.vocab_size)
  it = input_pipeline.make_train_iterator(config.data, tok, config.batch_size)
  start = time.perf_counter()
  batches = [next(it) for _ in range(num_batches)]
  pipeline_rate = num_batches / (time.perf_counter() - start)
  return model_config, batches, pipeline_rate


def run(config, steps: int, rounds: int, feeds: tuple[str, ...],
        prefetches: tuple[int, ...] = (0,), profile: bool = False,
        num_batches: int = 64) -> dict:
  """Alternating rounds of step alone and the loop's variants; medians.

  Variants: ``loop_<feed>`` (as ``python -m train`` runs today) and
  ``loop_<feed>_prefetch<n>`` (its iterator wrapped in DevicePrefetch).
  """
  from benchmarks.common import machine  # pylint: disable=import-outside-toplevel
  base = tempfile.mkdtemp(prefix="bench_loop_")
  variants = [(feed, n) for feed in feeds for n in prefetches]
  name = lambda feed, n: f"loop_{feed}" + (f"_prefetch{n}" if n else "")
  try:
    model_config, batches, pipeline_rate = prepare(config, base, num_batches)
    figures = {"step_alone": [], **{name(*v): [] for v in variants}}
    for _ in range(rounds):
      figures["step_alone"].append(time_step_alone(
          config, model_config, batches[0], steps)["steps_per_s"])
      for feed, n in variants:
        figures[name(feed, n)].append(time_loop(
            config, base, batches if feed == "memory" else None,
            steps, prefetch=n)["steps_per_s"])
    pieces = {}
    if profile:
      for n in prefetches:
        pieces[name("memory", n)] = time_loop(
            config, base, batches, steps, profile=True, prefetch=n)["pieces"]
  finally:
    shutil.rmtree(base, ignore_errors=True)
  med = {k: statistics.median(v) for k, v in figures.items()}
  record = {
      "benchmark": "loop", "preset": config.model_preset,
      "d_model": model_config.d_model, "vocab_size": model_config.vocab_size,
      "batch_size": config.batch_size, "max_len": config.data.max_len,
      "log_every_steps": config.log_every_steps, "steps": steps,
      "rounds": rounds,
      "step_alone_steps_per_s": round(med["step_alone"], 2),
      "step_alone_rounds": [round(x, 2) for x in figures["step_alone"]],
      "pipeline_batches_per_s_cold": round(pipeline_rate, 1),
  }
  for v in variants:
    key = name(*v)
    record[f"{key}_steps_per_s"] = round(med[key], 2)
    record[f"{key}_rounds"] = [round(x, 2) for x in figures[key]]
    record["ratio_" + key[len("loop_"):]] = round(
        med[key] / med["step_alone"], 3)
  if pieces:
    record["loop_pieces_ms_per_step"] = pieces
  record.update(machine())
  return record


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="experiments/configs/bible_es_en.py")
  parser.add_argument("--preset", default=GOAL_PRESET,
                      help='model preset; "" keeps the config\'s model')
  parser.add_argument("--vocab_size", type=int, default=GOAL_VOCAB,
                      help="0 keeps the config's")
  parser.add_argument("--data_dir", default="", help="tfds data_dir")
  parser.add_argument("--batch_size", type=int, default=0,
                      help="rows a step; 0 keeps the config's")
  parser.add_argument("--max_len", type=int, default=0,
                      help="tokens a row; 0 keeps the config's")
  parser.add_argument("--num_batches", type=int, default=64,
                      help="real batches held in memory for the memory feed")
  parser.add_argument("--steps", type=int, default=400,
                      help="timed steps per run (> 3 x log_every_steps)")
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--feeds", default="memory,pipeline",
                      help="loop feeds: memory (real batches cycled from "
                           "memory), pipeline (the input pipeline)")
  parser.add_argument("--prefetch", default="0,2",
                      help="comma-separated read-ahead sizes of the loop's "
                           "DevicePrefetch; 0: the loop without it")
  parser.add_argument("--profile", action="store_true",
                      help="add one cProfile'd memory-fed run: ms per step "
                           "of the loop's pieces")
  parser.add_argument("--output", default="", help="also write the JSON here")
  args = parser.parse_args(argv)
  feeds = tuple(f for f in args.feeds.split(",") if f)
  if not feeds or set(feeds) - {"memory", "pipeline"}:
    parser.error(f"--feeds={args.feeds}: a comma-separated subset of "
                 "memory,pipeline")
  if not os.path.isfile(args.config):
    parser.error(f"--config={args.config}: no such file; the configs are in "
                 "experiments/configs/")
  try:
    prefetches = tuple(int(n) for n in args.prefetch.split(","))
  except ValueError:
    parser.error(f"--prefetch={args.prefetch}: comma-separated counts, e.g. 0,2")
  if min(prefetches) < 0:
    parser.error(f"--prefetch={args.prefetch}: counts >= 0")
  if args.steps < 1 or args.rounds < 1:
    parser.error("--steps and --rounds: at least 1")
  config = make_config(args.config, args.preset, args.vocab_size,
                       args.data_dir, args.batch_size, args.max_len)
  if args.steps < 3 * config.log_every_steps:
    parser.error(f"--steps={args.steps}: at least 3 x log_every_steps "
                 f"({3 * config.log_every_steps}) so the loop is timed "
                 "between log records")
  record = run(config, args.steps, args.rounds, feeds, prefetches,
               args.profile, max(1, args.num_batches))
  text = json.dumps(record, sort_keys=True)
  print(text, flush=True)
  if args.output:
    with open(args.output, "w", encoding="utf-8") as f:
      f.write(text + "\n")
  return record


if __name__ == "__main__":
  sys.exit(0 if main() else 1)
