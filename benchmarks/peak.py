"""This machine's matmul peak, GFLOP/s: float32, and bfloat16 inputs with float32 accumulation.

A jitted jnp.dot of large squares, warm, median of several runs. Every MFU the
other benchmarks print is relative to the float32 figure measured here.

  python -m benchmarks.peak [--size 2048] [--repeats 7]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks.common import emit, machine, median_seconds, table


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
