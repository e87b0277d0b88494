"""The benchmarks' bookkeeping: the profile's trace events mapped to model
parts, decode_ab's two versions of the searches, the training benchmark on
two devices."""

import pathlib
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import profile


class _Block(nn.Module):
  d_ff: int = 512

  @nn.compact
  def __call__(self, x):
    ffn = nn.Sequential([nn.Dense(self.d_ff, name="wi"), nn.relu,
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
  # A wide feed-forward (~0.5 GFLOP against a layer norm of 32k values), so
  # that one preempted op on a loaded machine cannot reorder the parts.
  model = _Block(d_ff=2048)
  x = jnp.ones((256, 128))
  params = model.init(jax.random.key(0), x)
  result = profile.profile("block", jax.jit(model.apply), (params, x),
                           str(tmp_path), repeats=5)
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


def _tiny_search_inputs():
  from model import TransformerConfig, init_params  # pylint: disable=import-outside-toplevel
  config = TransformerConfig.preset("tiny", num_encoder_layers=1,
                                    num_decoder_layers=1)
  params = jax.jit(init_params, static_argnums=0)(config, jax.random.key(0))
  rng = np.random.RandomState(0)
  batches = [jnp.asarray(rng.randint(3, config.vocab_size, size=(4, width)),
                         jnp.int32) for width in (8, 16)]
  return config, params, batches


def test_decode_ab_times_both_versions_and_tells_different_tokens(tmp_path):
  from benchmarks import decode_ab  # pylint: disable=import-outside-toplevel
  from model import decoding  # pylint: disable=import-outside-toplevel
  config, params, batches = _tiny_search_inputs()
  package = pathlib.Path(decoding.__file__).parent   # model/decoding/
  copy = lambda to: shutil.copytree(
      package, to, ignore=shutil.ignore_patterns("__pycache__"))
  same = tmp_path / "same"
  copy(same)
  greedy = (same / "greedy.py").read_text()
  assert "return layers.argmax(logits)" in greedy
  argmin = tmp_path / "argmin"   # greedy picks the least likely token
  copy(argmin)
  (argmin / "greedy.py").write_text(greedy.replace(
      "return layers.argmax(logits)", "return layers.argmax(-logits)"))
  for path, expected in ((same, True), (argmin, False)):
    versions = {"ours": decoding,
                "theirs": decode_ab.load_decoding(path, f"model.{path.stem}")}
    result = decode_ab.compare(versions, config, params, batches, "greedy",
                               rounds=2)
    assert result["same_tokens"] is expected
    assert all(len(s) == 2 and min(s) > 0
               for s in result["seconds"].values())


def test_decode_ab_refuses_a_missing_checkout(tmp_path, monkeypatch, capsys):
  from benchmarks import decode_ab  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr("sys.argv", ["decode_ab", f"--against={tmp_path}"])
  with pytest.raises(SystemExit) as e:
    decode_ab.main()
  assert e.value.code == 2
  assert "model/decoding.py" in capsys.readouterr().err


# ---------------------------------------------------------------- MFU's peak

from benchmarks import peak as peak_lib  # noqa: E402


@pytest.mark.parametrize("kind, tflops", [
    ("NVIDIA H200", 989.0), ("NVIDIA H200 NVL", 835.0),
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("TPU v4", 275.0),
    ("TPU v5 lite", 197.0), ("TPU v5e", 197.0), ("TPU v5p", 459.0),
    ("TPU v5", 459.0), ("TPU v6 lite", 918.0)])
def test_bf16_run_divides_by_the_datasheet_bf16_peak(kind, tflops):
  chosen = peak_lib.choose("bfloat16", kind, measured_gflops=123.0)
  assert chosen["peak_gflops"] == tflops * 1000
  assert chosen["peak_dtype"] == "bfloat16"
  assert chosen["peak_source"].startswith("datasheet:")
  assert f"{tflops:g}" in chosen["peak_source"]


def test_f32_run_and_unknown_chips_divide_by_the_matmul_timed_in_the_run():
  f32 = peak_lib.choose("float32", "NVIDIA H200", measured_gflops=51_000.0)
  assert f32["peak_gflops"] == 51_000.0 and f32["peak_dtype"] == "float32"
  assert f32["peak_source"].startswith("measured:")
  cpu = peak_lib.choose("bfloat16", "cpu", measured_gflops=80.0,
                        measured_what="2048^3 bfloat16 jnp.dot")
  assert cpu["peak_gflops"] == 80.0
  assert "2048^3 bfloat16" in cpu["peak_source"]
  with pytest.raises(ValueError, match="no bfloat16 peak"):
    peak_lib.choose("bfloat16", "Some New Chip", measured_gflops=None)
  with pytest.raises(ValueError, match="float16"):
    peak_lib.choose("float16", "NVIDIA H200", measured_gflops=1.0)


# ---------------------------------------------------------------- accelerator

@pytest.mark.slow
def test_accelerator_quick_form_writes_every_part(bible_data_dir, tmp_path):
  """benchmarks/accelerator.sh --quick on the CPU: the loop against its step,
  a short run's train.choose, and a bf16 step whose MFU divides by a bf16
  peak, in one JSON."""
  import json
  import os
  import subprocess
  import sys
  out = tmp_path / "accelerator.json"
  root = pathlib.Path(__file__).resolve().parents[1]
  env = dict(os.environ, PYTHON=sys.executable, DATA_DIR=str(bible_data_dir))
  proc = subprocess.run(
      ["bash", str(root / "benchmarks" / "accelerator.sh"), "--quick",
       f"--out={out}"], capture_output=True, text=True, env=env, timeout=1800,
      check=False)
  assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
  record = json.loads(out.read_text())
  assert record["mode"] == "quick" and record["errors"] == []
  loop = record["loop"]
  assert loop["step_alone_steps_per_s"] > 0
  for key in ("memory", "memory_prefetch2"):
    assert loop[f"ratio_{key}"] == pytest.approx(
        loop[f"loop_{key}_steps_per_s"] / loop["step_alone_steps_per_s"],
        abs=2e-3)
  assert record["choose"]["chosen"].startswith("--")
  assert record["choose"]["seconds"] > 0
  base = record["base_bf16"]
  assert base["dtype"] == "bfloat16" and base["peak_dtype"] == "bfloat16"
  assert base["peak_source"].startswith("measured:")   # a CPU: no datasheet
  # achieved_gflops is printed to 0.1: a loose match, still far from the
  # float32 peak the bf16 step was once divided by.
  assert base["mfu"] == pytest.approx(
      base["achieved_gflops"] / base["peak_gflops"], rel=0.1)


def test_loop_is_timed_between_the_second_and_last_log_records():
  from benchmarks import loop
  records = [{"step": 1, "time": 0.0, "steps_per_sec": 1.0},
             {"step": 20, "time": 10.0, "steps_per_sec": 2.0},
             {"step": 20, "time": 10.5, "eval_loss": 3.0},   # not a log line
             {"step": 40, "time": 12.0, "steps_per_sec": 10.0},
             {"step": 60, "time": 14.0, "steps_per_sec": 10.0}]
  assert loop.steady_steps_per_s(records) == pytest.approx(40 / 4.0)
  with pytest.raises(ValueError, match="too few log records"):
    loop.steady_steps_per_s(records[:2])
