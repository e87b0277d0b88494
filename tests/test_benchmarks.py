"""The profile benchmark's bookkeeping: trace events mapped to model parts."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from benchmarks import profile


class _Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    ffn = nn.Sequential([nn.Dense(512, name="wi"), nn.relu,
                         nn.Dense(128, name="wo")], name="ffn")
    return nn.LayerNorm(name="ffn_norm")(x + ffn(x))


def test_hlo_index_names_flax_module_paths():
  model = _Block()
  x = jnp.ones((64, 128))
  params = model.init(jax.random.key(0), x)
  compiled = jax.jit(model.apply).lower(params, x).compile()
  index = profile.hlo_op_index(compiled.as_text())
  paths = [op_name for _, op_name in index.values()]
  assert any("ffn/wi/dot_general" in p for p in paths)
  assert profile.part_of("fusion", "jit(apply)/ffn/wi/dot_general") == (
      "feed-forward (wi, wo, relu)")
  assert profile.part_of(
      "fusion", "jit(x)/decoder/layers_0/self_attention/query/dot_general"
  ) == "attention projections (q, k, v, out)"
  assert profile.part_of(
      "fusion", "jit(x)/decoder/layers_1/self_attention_norm/reduce_sum"
  ) == "layer norm"
  assert profile.part_of(
      "fusion", "jit(x)/jit(_beam_segment)/while/body/gather"
  ) == "search (top-k, gather, beam history copies)"
  assert profile.part_of(
      "fusion",
      "jit(x)/jit(_beam_segment)/while/body/copy_histories/while/body/"
      "dynamic_slice") == "search (top-k, gather, beam history copies)"
  assert profile.part_of("copy", "") == profile.OTHER


def test_profile_puts_the_matmuls_time_in_the_feed_forward(tmp_path):
  model = _Block()
  x = jnp.ones((256, 128))
  params = model.init(jax.random.key(0), x)
  result = profile.profile("block", jax.jit(model.apply), (params, x),
                           str(tmp_path), repeats=3)
  parts = result["by_part"]
  assert parts["feed-forward (wi, wo, relu)"] > 0
  assert max(parts, key=parts.get) == "feed-forward (wi, wo, relu)"
  assert 0 < result["ops_ms"] <= result["wall_ms"]


def test_training_benchmark_two_devices_train_like_one():
  """--devices=1,2: the data-parallel step over two host devices is timed,
  and it computes the same losses as the one-device step (same batch, same
  number of steps)."""
  import json
  import subprocess
  import sys
  out = subprocess.run(
      [sys.executable, "-m", "benchmarks.training", "--presets=tiny",
       "--max_lens=32", "--tokens_per_step=512", "--steps=2",
       "--devices=1,2", "--peak_gflops=1"],
      capture_output=True, text=True, check=True, timeout=600)
  records = [json.loads(line) for line in out.stdout.splitlines()
             if line.startswith("{")]
  assert [(r["devices"], r["num_devices"]) for r in records] == [(1, 1), (2, 2)]
  one, two = records
  assert one["steps_per_s"] > 0 and two["steps_per_s"] > 0
  assert abs(one["final_loss"] - two["final_loss"]) < 1e-3 * one["final_loss"]
