"""Training-step benchmark: steps/s, target tokens/s, FLOPs, MFU, compile time, peak RSS.

    python -m benchmarks.training [--presets tiny,small,base] [--max_lens 64,128,256]
        [--tokens_per_step 0] [--steps 0] [--dtype float32]
        [--prng default|threefry2x32|rbg|unsafe_rbg] [--peak_gflops 0]
        [--devices 1,2]

Runs ``train.steps.train_step`` exactly as training binds it
(``train.steps.build``), under ``jax.jit`` with the state donated, on
synthetic packed batches of the input pipeline's format (src, tgt, *_segment_ids,
*_positions: int32 [rows, max_len]). Every step holds the same number of
positions (``--tokens_per_step``; default 16 rows x 128 = 2048, the batch of
experiments/configs/bible_es_en.py): rows = tokens_per_step // max_len.

``--devices 1,2`` times each configuration on 1 and on 2 host devices: the
child process sets ``--xla_force_host_platform_device_count`` and trains
through ``train.sharding.make_runner`` with the mesh's data axis over every
device (the batch split, the state replicated), as ``python -m train`` does
when it finds several devices; so two CPU devices each taking half the batch
are timed against one device whose ops use both cores.

Each (preset, max_len) runs in its own subprocess so that compile time and the
peak resident memory (``resource.getrusage``, ``ru_maxrss``) belong to that
configuration alone. ``mfu`` divides by the peak of the run's dtype
(``benchmarks.peak.choose``; ``peak_gflops``, ``peak_source``): for a
bfloat16 run on a known accelerator (H200, H100, A100, TPU v4 / v5e / v5p /
v6e) its datasheet's dense bf16 peak, otherwise a matmul of the run's dtype
(2048^3 on a CPU, 8192^3 on an accelerator) timed in the child before the
steps; ``mfu_vs_measured_peak`` divides by that timed matmul in every case.
The float32 peak timed once at the start (``peak_f32_gflops_run_start``)
gives ``mfu_vs_run_start_peak`` for float32 runs.

Model FLOPs per step (``model_flops``, the usual 6ND count, Kaplan et al. 2020 /
PaLM appendix B):

    6 * (P_enc * S + (P_dec + P_out) * T)                  matmul weights
  + 3 * 4 * d_model * rows * L_q * L_k * (#attention blocks)  scores and values

P_enc / P_dec: the kernels of every Dense (q, k, v, out, wi, wo) in the
encoder / decoder; P_out = vocab x d_model, the tied pre-softmax projection;
S, T: source and target positions computed (rows x max_len, padding included,
since the hardware computes it). Attention: QK^T and AV are 2 * L_q * L_k *
d_model FLOPs each per row in the forward pass; x3 for forward + backward.
Embedding lookups, LayerNorm, softmax, dropout, the loss and Adam are not model
FLOPs. XLA's own count (``compiled.cost_analysis()['flops']``) is printed beside
it: it also counts element-wise work, so it is a little higher.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np


# ---------------------------------------------------------------- data

def synthetic_batch(rows: int, max_len: int, vocab_size: int, seed: int = 0
                    ) -> dict[str, np.ndarray]:
  """Packed rows like ``train/input_pipeline.py`` makes: pairs laid end to end.

  Pair lengths are drawn so that a row holds a few pairs (target about as long
  as the source), the tail of a row that fits no more pairs is padding (0).
  Not ``train.batches.SyntheticBatches``: that learnable copy task holds two
  pairs a row, about half full; timing wants rows as full as packing makes
  them (~0.93 on bible_es_en).
  """
  from train.batches import BATCH_KEYS  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  out = {k: np.zeros((rows, max_len), np.int32) for k in BATCH_KEYS}
  for r in range(rows):
    s_at = t_at = 0
    segment = 1
    while True:
      s_len = int(rng.integers(4, max(5, max_len // 2)))
      t_len = max(2, int(s_len * rng.uniform(0.8, 1.25)))
      if s_at + s_len > max_len or t_at + t_len > max_len:
        break
      for side, at, n in (("src", s_at, s_len), ("tgt", t_at, t_len)):
        tokens = rng.integers(2, vocab_size, size=n).astype(np.int32)
        tokens[-1] = 1  # eos
        out[side][r, at:at + n] = tokens
        out[f"{side}_segment_ids"][r, at:at + n] = segment
        out[f"{side}_positions"][r, at:at + n] = np.arange(n)
      s_at += s_len
      t_at += t_len
      segment += 1
  return out


# ---------------------------------------------------------------- FLOPs

def model_flops(model_config, rows: int, max_len: int) -> dict[str, float]:
  """Model FLOPs of one training step (forward + backward); see module doc."""
  d, f = model_config.d_model, model_config.d_ff
  attn = 4 * d * d                       # q, k, v, out kernels
  ffn = 2 * d * f                        # wi, wo
  p_enc = model_config.num_encoder_layers * (attn + ffn)
  p_dec = model_config.num_decoder_layers * (2 * attn + ffn)
  p_out = model_config.output_vocab_size * d
  tokens = rows * max_len                # S = T: source and target positions
  matmul = 6 * (p_enc * tokens + (p_dec + p_out) * tokens)
  blocks = model_config.num_encoder_layers + 2 * model_config.num_decoder_layers
  attention = 3 * 4 * d * rows * max_len * max_len * blocks
  return {"matmul_params": p_enc + p_dec + p_out,
          "flops": float(matmul + attention),
          "attention_share": attention / (matmul + attention)}


def xla_flops(compiled) -> float | None:
  """XLA's own FLOP count of a compiled executable, or None if unavailable."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  value = (cost or {}).get("flops")
  return float(value) if value is not None else None


# ---------------------------------------------------------------- one config

def build(preset: str, max_len: int, tokens_per_step: int, dtype: str,
          model_overrides: dict | None = None):
  """(model_config, rows, parts, state, batch, rng) of one config.

  parts is ``train.steps.build``'s (``parts["train_step"]`` not jitted), state
  its fresh train state, batch one synthetic packed batch of
  rows = tokens_per_step // max_len.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from experiments.configs import base_config  # pylint: disable=import-outside-toplevel
  from model import TransformerConfig  # pylint: disable=import-outside-toplevel
  from train import steps as steps_lib  # pylint: disable=import-outside-toplevel

  model_config = TransformerConfig.preset(
      preset, max_len=max(max_len, 8), dtype=dtype, **(model_overrides or {}))
  config = base_config()  # the paper's optimiser and label smoothing
  parts = steps_lib.build(model_config, config.optimizer,
                          config.label_smoothing)
  rows = max(1, tokens_per_step // max_len)
  batch = {k: jnp.asarray(v) for k, v in synthetic_batch(
      rows, max_len, model_config.vocab_size).items()}
  state = jax.jit(parts["create_state"])(jax.random.key(0))
  return model_config, rows, parts, state, batch, jax.random.key(1)


def run_one(preset: str, max_len: int, tokens_per_step: int, steps: int,
            dtype: str, prng: str, peak_gflops: float,
            model_overrides: dict | None = None, devices: int = 1) -> dict:
  """Compile and time train_step for one (preset, max_len) in this process."""
  if devices > 1:  # before jax initialises its backend
    os.environ["XLA_FLAGS"] = " ".join(
        [os.environ.get("XLA_FLAGS", ""),
         f"--xla_force_host_platform_device_count={devices}"]).strip()
  import jax  # pylint: disable=import-outside-toplevel
  if prng != "default":
    jax.config.update("jax_default_prng_impl", prng)
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from benchmarks.common import machine  # pylint: disable=import-outside-toplevel

  model_config, rows, parts, state, batch, rng = build(
      preset, max_len, tokens_per_step, dtype, model_overrides)
  if devices == 1:
    step = jax.jit(parts["train_step"], donate_argnums=(0,))
    start = time.perf_counter()
    compiled = step.lower(state, batch, rng).compile()
    compile_s = time.perf_counter() - start
  else:
    # Training's own placement: batch rows over the data axis, state by the
    # rules (replicated for a data-only mesh), the step under the mesh.
    from train import sharding  # pylint: disable=import-outside-toplevel
    if jax.device_count() != devices:
      raise RuntimeError(f"asked for {devices} devices, jax has "
                         f"{jax.device_count()} (XLA_FLAGS set too late?)")
    runner = sharding.make_runner(parts, rows, mesh_config={"data": -1})
    state = runner.place_state(state)
    batch = runner.place_batch({k: np.asarray(v) for k, v in batch.items()})
    compiled = runner.train_step
    start = time.perf_counter()
    state, _ = compiled(state, batch, rng)   # compiles, then runs one step
    jax.block_until_ready(state)
    compile_s = time.perf_counter() - start

  # The peak MFU divides by: the run's dtype's (benchmarks.peak.choose),
  # a bf16 datasheet figure on a known accelerator, else a matmul of that
  # dtype timed here, before the steps, on this process's device.
  from benchmarks import peak as peak_lib  # pylint: disable=import-outside-toplevel
  platform = jax.devices()[0].platform
  size = peak_lib.default_size(platform)
  measured = round(peak_lib.measure(size, jnp.dtype(dtype), 5), 1)
  chosen = peak_lib.choose(dtype, jax.devices()[0].device_kind, measured,
                           f"{size}^3 {dtype} jnp.dot")
  if devices == 1:  # warm-up (with several devices, the compiling call was)
    state, metrics = compiled(state, batch, rng)
    jax.block_until_ready((state, metrics))
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batch, rng)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  seconds = float(np.median(times))

  flops = model_flops(model_config, rows, max_len)
  xla = xla_flops(compiled) if devices == 1 else None
  tgt_tokens = int(np.count_nonzero(np.asarray(batch["tgt"])))
  achieved = flops["flops"] / seconds / 1e9
  return {
      "benchmark": "train", "preset": preset, "max_len": max_len,
      "dtype": dtype, "prng": prng, "rows": rows, "devices": devices,
      "model_overrides": model_overrides or {},
      "steps_timed": steps, "step_s": round(seconds, 4),
      "step_s_min": round(min(times), 4),
      "steps_per_s": round(1 / seconds, 3),
      "tgt_tokens_per_step": tgt_tokens,
      "tgt_tokens_per_s": round(tgt_tokens / seconds),
      "matmul_params": flops["matmul_params"],
      "model_gflops_per_step": round(flops["flops"] / 1e9, 2),
      "xla_gflops_per_step": round(xla / 1e9, 2) if xla else None,
      "formula_over_xla": round(flops["flops"] / xla, 3) if xla else None,
      "attention_flops_share": round(flops["attention_share"], 3),
      "achieved_gflops": round(achieved, 1),
      "peak_f32_gflops_run_start": peak_gflops or None,
      # The peak of this run's dtype, and where it came from.
      "peak_gflops": round(chosen["peak_gflops"], 1),
      "peak_dtype": chosen["peak_dtype"],
      "peak_source": chosen["peak_source"],
      f"measured_{dtype}_matmul_gflops": measured,
      "mfu": round(achieved / chosen["peak_gflops"], 4),
      "mfu_vs_measured_peak": round(achieved / measured, 4),
      "mfu_vs_run_start_peak": (round(achieved / peak_gflops, 3)
                                if peak_gflops and dtype == "float32"
                                else None),
      # With several devices: the first call, compilation and one step.
      "compile_s": round(compile_s, 2),
      # Linux reports ru_maxrss in KiB.
      "peak_rss_mib": round(resource.getrusage(
          resource.RUSAGE_SELF).ru_maxrss / 1024),
      "final_loss": round(float(metrics["loss"]), 4),
      **machine(),
  }


# ---------------------------------------------------------------- driver

# Timed steps per preset: fewer where a step takes seconds, so the default run
# stays within a few minutes. Every preset gets 16 rows x 128 = 2048
# positions a step, the batch of experiments/configs/bible_es_en.py.
DEFAULT_STEPS = {"tiny": 20, "small": 8, "base": 3}
DEFAULT_TOKENS_PER_STEP = 2048


def run(presets=("tiny", "small", "base"), max_lens=(64, 128, 256),
        tokens_per_step: int = 0, steps: int = 0, dtype: str = "float32",
        prng: str = "default", peak_gflops: float = 0.0,
        model_overrides: dict | None = None, quiet_table: bool = False,
        devices=(1,)) -> list[dict]:
  """All configurations, each in a subprocess; returns the records."""
  from benchmarks.common import emit, table  # pylint: disable=import-outside-toplevel
  if not peak_gflops:
    from benchmarks import peak  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    peak_gflops = round(peak.measure(2048, jnp.float32, 5), 1)
  records = []
  for preset, max_len, n_devices in itertools.product(presets, max_lens,
                                                     devices):
    args = dict(preset=preset, max_len=max_len,
                tokens_per_step=tokens_per_step or DEFAULT_TOKENS_PER_STEP,
                steps=steps or DEFAULT_STEPS.get(preset, 3), dtype=dtype,
                prng=prng, peak_gflops=peak_gflops,
                model_overrides=model_overrides, devices=n_devices)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.training", "--one", json.dumps(args)],
        capture_output=True, text=True, check=False)
    if proc.returncode:
      sys.stderr.write(proc.stderr[-3000:])
      record = {"benchmark": "train", "preset": preset, "max_len": max_len,
                "error": proc.stderr.strip().splitlines()[-1:]}
    else:
      record = json.loads(proc.stdout.strip().splitlines()[-1])
    record["load_avg_1m_at_start"] = load
    records.append(emit(record))
  if not quiet_table:
    print(table(records, ["preset", "max_len", "dtype", "rows", "devices",
                          "steps_per_s",
                          "tgt_tokens_per_s", "model_gflops_per_step",
                          "xla_gflops_per_step", "mfu", "compile_s",
                          "peak_rss_mib"]))
  return records


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--presets", default="tiny,small,base")
  parser.add_argument("--max_lens", default="64,128,256")
  parser.add_argument("--tokens_per_step", type=int, default=0,
                      help="0: 2048 (16 rows x 128, bible_es_en's batch)")
  parser.add_argument("--steps", type=int, default=0,
                      help="timed steps per config; 0: 20 tiny, 8 small, 3 base")
  parser.add_argument("--dtype", default="float32",
                      choices=["float32", "bfloat16"])
  parser.add_argument("--prng", default="default",
                      choices=["default", "threefry2x32", "rbg", "unsafe_rbg"],
                      help="jax_default_prng_impl for the dropout keys")
  parser.add_argument("--model", default="{}",
                      help="JSON dict of TransformerConfig overrides")
  parser.add_argument("--peak_gflops", type=float, default=0.0,
                      help="float32 peak to use; 0: measure it now")
  parser.add_argument("--devices", default="1",
                      help="comma-separated host device counts to time each "
                           "config on (data parallel over the mesh)")
  parser.add_argument("--one", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.one:  # child process: one configuration, one JSON line
    print(json.dumps(run_one(**json.loads(args.one))), flush=True)
    return
  from benchmarks.common import device_counts  # pylint: disable=import-outside-toplevel
  devices = device_counts(parser, args.devices)
  run(args.presets.split(","), [int(x) for x in args.max_lens.split(",")],
      args.tokens_per_step, args.steps, args.dtype, args.prng,
      args.peak_gflops, json.loads(args.model),
      devices=devices)


if __name__ == "__main__":
  main()
