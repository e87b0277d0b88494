"""This machine's matmul peak, GFLOP/s: float32, and bfloat16 inputs with float32 accumulation.

A jitted jnp.dot of large squares, warm, median of several runs.

``choose(dtype, device_kind, measured_gflops)`` is the peak an MFU divides by:
a run's matmul dtype's. For bfloat16 on a known accelerator, the datasheet's
dense bf16 peak (``BF16_DATASHEET_TFLOPS``, matched on ``device_kind``);
otherwise (float32 anywhere, bf16 on a CPU or an unknown chip) the matmul of
that dtype timed in the same run, before the steps. The record says which
(``peak_source``).

  python -m benchmarks.peak [--size 2048] [--repeats 7]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks.common import emit, machine, median_seconds, table


# Dense (no sparsity) bf16 matmul peaks per chip, TFLOP/s, from the vendors'
# datasheets; matched on jax's device_kind, the first substring that occurs
# in it (lower case) wins, so the more specific names come first.
BF16_DATASHEET_TFLOPS: tuple[tuple[str, str, float], ...] = (
    ("h200 nvl", "NVIDIA H200 NVL", 835.0),
    ("h200", "NVIDIA H200 SXM", 989.0),
    ("h100 nvl", "NVIDIA H100 NVL", 835.0),
    ("h100 pcie", "NVIDIA H100 PCIe", 756.0),
    ("h100", "NVIDIA H100 SXM", 989.0),
    ("a100", "NVIDIA A100", 312.0),
    ("tpu v6", "TPU v6e (Trillium)", 918.0),
    ("tpu v5 lite", "TPU v5e", 197.0),
    ("tpu v5e", "TPU v5e", 197.0),
    ("tpu v5p", "TPU v5p", 459.0),
    ("tpu v5", "TPU v5p", 459.0),
    ("tpu v4", "TPU v4", 275.0),
)


def bf16_datasheet(device_kind: str) -> tuple[str, float] | None:
  """(chip name, dense bf16 TFLOP/s) of a device_kind, or None if unknown."""
  kind = device_kind.lower()
  for key, name, tflops in BF16_DATASHEET_TFLOPS:
    if key in kind:
      return name, tflops
  return None


def choose(dtype: str, device_kind: str, measured_gflops: float | None,
           measured_what: str = "") -> dict:
  """The peak an MFU of a ``dtype`` run divides by, and where it came from.

  dtype: the run's compute dtype, "float32" or "bfloat16"; measured_gflops:
  a ``measure`` of that dtype in the same run (None if not timed).
  """
  if dtype not in ("float32", "bfloat16"):
    raise ValueError(f"dtype={dtype!r}: float32 or bfloat16")
  sheet = bf16_datasheet(device_kind) if dtype == "bfloat16" else None
  if sheet is not None:
    name, tflops = sheet
    return {"peak_gflops": tflops * 1000, "peak_dtype": dtype,
            "peak_source": f"datasheet: {name} dense bf16 {tflops:g} TFLOP/s"}
  if not measured_gflops:
    raise ValueError(f"no {dtype} peak for {device_kind!r}: time a {dtype} "
                     "matmul in the run (benchmarks.peak.measure)")
  return {"peak_gflops": float(measured_gflops), "peak_dtype": dtype,
          "peak_source": f"measured: {measured_what or dtype + ' matmul'} "
                         "timed in this run before the steps"}


def default_size(platform: str) -> int:
  """Squares large enough to reach an accelerator's peak; a CPU's at 2048."""
  return 2048 if platform == "cpu" else 8192


def measure(size: int, dtype, repeats: int) -> float:
  """GFLOP/s of a [size, size] @ [size, size] product (2 size^3 FLOPs)."""
  key_a, key_b = jax.random.split(jax.random.key(0))
  a = jax.random.normal(key_a, (size, size), jnp.float32).astype(dtype)
  b = jax.random.normal(key_b, (size, size), jnp.float32).astype(dtype)
  dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  seconds = median_seconds(lambda: dot(a, b).block_until_ready(), repeats=repeats)
  return 2 * size**3 / seconds / 1e9


def run(size: int = 2048, repeats: int = 7) -> dict[str, float]:
  rows = []
  for name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
    rows.append(emit({"benchmark": "peak", "dtype": name, "size": size,
                      "gflops": round(measure(size, dtype, repeats), 1),
                      **machine()}))
  print(table(rows, ["dtype", "size", "gflops"]))
  return {r["dtype"]: r["gflops"] for r in rows}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", type=int, default=2048)
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args()
  run(args.size, args.repeats)


if __name__ == "__main__":
  main()
