"""Every experiment config loads and builds its model abstractly, so none rots;
the TPU VM scripts' dry runs print the commands they would run."""

import importlib.util
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import Transformer
from train import steps, trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "experiments" / "configs").glob("*.py")
                 if p.name != "__init__.py")


def load(path):
  spec = importlib.util.spec_from_file_location(f"config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_all_expected_configs_exist():
  names = {p.stem for p in CONFIGS}
  assert {"tiny", "bible_es_en", "bible_es_en_base", "wmt14_en_de_base",
          "wmt14_en_de_big", "wmt17_de_en"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_builds_its_model_and_optimizer_abstractly(path):
  config = load(path)
  model_config = trainer.model_config_for(config, config.data.vocab_size)
  assert model_config.max_len >= config.data.max_len
  src = jnp.ones((2, config.data.max_len), jnp.int32)
  variables = jax.eval_shape(Transformer(model_config).init, jax.random.key(0),
                             src, src)
  params = variables["params"]
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  assert count > 0
  tx, _ = steps.make_optimizer(config.optimizer, model_config.d_model)
  opt_state = jax.eval_shape(tx.init, params)
  assert jax.tree.leaves(opt_state)
  assert config.batch_size > 0 and config.num_train_steps > 0


def test_config_model_fields_are_the_models():
  """config.model has one typed placeholder per TransformerConfig field, so
  every model field can be set from the command line."""
  import dataclasses
  from experiments import configs
  from model import TransformerConfig
  fields = {f.name: f.type for f in dataclasses.fields(TransformerConfig)}
  assert set(configs.MODEL_FIELDS) == set(fields)
  for name, kind in configs.MODEL_FIELDS.items():
    assert str(fields[name]).split("|")[0].strip() == kind.__name__, name


def test_logical_axis_rules_cover_the_models_names():
  """Every logical axis name the model uses (params and activations) has a
  rule, and every rule names an axis the model uses."""
  import flax.linen as nn
  from experiments import configs
  from model import TransformerConfig
  cfg = TransformerConfig.preset("tiny")
  tokens = jnp.ones((1, 8), jnp.int32)
  boxed = jax.eval_shape(
      lambda: Transformer(cfg).init(jax.random.key(0), tokens, tokens))
  specs = jax.tree.leaves(
      nn.get_partition_spec(boxed),
      is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  used = {axis for spec in specs for axis in spec if axis}
  model_source = "".join(p.read_text() for p in (ROOT / "model").glob("*.py"))
  used.update(n for n in ("activation_batch", "activation_length",
                          "activation_embed", "activation_mlp",
                          "activation_vocab") if f'"{n}"' in model_source)
  ruled = {name for name, _ in configs.LOGICAL_AXIS_RULES}
  assert used == ruled


def test_configs_import_only_ml_collections():
  """Configs are data: loading one imports nothing of model/, train/ or
  tokenizer/ (a fresh interpreter, so nothing is preloaded)."""
  code = ("import sys, importlib.util as u\n"
          "for name in ('tiny', 'bible_es_en', 'wmt14_en_de_big', 'wmt17_de_en'):\n"
          "  s = u.spec_from_file_location(name, f'experiments/configs/{name}.py')\n"
          "  m = u.module_from_spec(s); s.loader.exec_module(m); m.get_config()\n"
          "print(sorted(n for n in sys.modules if n.split('.')[0] in "
          "('model', 'train', 'tokenizer', 'jax', 'flax')))")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, text=True,
                       capture_output=True, check=True).stdout
  assert out.strip() == "[]"


def test_paper_configs_use_the_papers_settings():
  base, big = (load(ROOT / f"experiments/configs/wmt14_en_de_{n}.py")
               for n in ("base", "big"))
  for c in (base, big):
    assert (c.data.source_lang, c.data.target_lang) == ("en", "de")
    assert c.optimizer.warmup_steps == 4000 and c.label_smoothing == 0.1
    assert (c.optimizer.adam_b1, c.optimizer.adam_b2, c.optimizer.adam_eps) == (
        0.9, 0.98, 1e-9)
    assert c.eval_bleu_beam_size == 4 and c.eval_bleu_alpha == 0.6
    # ~25k target tokens per step: rows x max_len at ~0.9 packing.
    assert 22_000 <= c.batch_size * c.data.max_len * 0.9 <= 28_000
  assert base.num_train_steps == 100_000 and big.num_train_steps == 300_000
  assert trainer.model_config_for(base, 37000).dropout_rate == 0.1
  assert trainer.model_config_for(big, 37000).dropout_rate == 0.3
  assert trainer.model_config_for(big, 37000).d_model == 1024
  assert base.checkpoint.max_to_keep >= 5 and big.checkpoint.max_to_keep >= 20


def test_bible_configs_shapes():
  # bible_es_en narrows `small`; bible_es_en_base, built on it, is the
  # paper's base shape, not a narrowed one.
  cpu, accel = (load(ROOT / f"experiments/configs/{n}.py")
                for n in ("bible_es_en", "bible_es_en_base"))
  small = trainer.model_config_for(cpu, 8000)
  base = trainer.model_config_for(accel, 8000)
  assert (small.d_model, small.d_ff, small.num_encoder_layers) == (192, 768, 3)
  assert (base.d_model, base.d_ff, base.num_heads, base.num_encoder_layers,
          base.num_decoder_layers) == (512, 2048, 8, 6, 6)
  # The dropout each trains at over its whole length: bible_es_en's
  # long-run rule (0.1 from 2,750 steps); base's 0.3 at any length.
  from train import run_length
  assert run_length.dropout_for_length(cpu, 1000) == 0.0
  assert run_length.dropout_for_length(cpu, 3000) == 0.1
  assert run_length.dropout_for_length(accel, accel.num_train_steps) == 0.3


@pytest.mark.parametrize("script, args, expected", [
    ("create.sh", ["--accelerator", "v4-32"],
     ["gcloud compute tpus tpu-vm create", "--accelerator-type=v4-32"]),
    ("install.sh", ["--repo", "https://example.org/mt.git"],
     ["--worker=all", "git clone https://example.org/mt.git", ".[tpu]"]),
    ("prepare_wmt.sh", ["--bucket", "gs://b"],
     ["--worker=0", "tfds build wmt14_translate/de-en",
      "--data_dir=gs://b/tensorflow_datasets", "--file_format=array_record"]),
    ("launch.sh", ["--bucket", "gs://b", "--", "--config.mesh.fsdp=4"],
     ["--worker=all", "python -m train --config=experiments/configs/wmt14_en_de_base.py",
      "--workdir=gs://b/runs/wmt14_en_de_base", "--config.distributed.enabled=True",
      "--config.mesh.fsdp=4"]),
    ("evaluate.sh", ["--bucket", "gs://b", "--", "--average_last=5"],
     ["--worker=0", "python -m train.evaluate --workdir=gs://b/runs/wmt14_en_de_base",
      "--split=test", "--average_last=5"]),
])
def test_tpu_vm_dry_runs_print_the_commands(script, args, expected):
  out = subprocess.run(["bash", str(ROOT / "experiments/tpu_vm" / script),
                        "--dry-run", *args], capture_output=True, text=True,
                       check=True).stdout
  assert out.startswith("+ gcloud compute tpus tpu-vm")
  for piece in expected:
    assert piece in out, (piece, out)


def test_tpu_vm_scripts_refuse_a_missing_bucket():
  out = subprocess.run(["bash", str(ROOT / "experiments/tpu_vm/launch.sh"),
                        "--dry-run"], capture_output=True, text=True)
  assert out.returncode == 2 and "--bucket gs://" in out.stderr


@pytest.mark.parametrize("args, needle", [
    (["--minutes"], "--minutes needs a value"),
    (["--show"], "--show needs a value"),
    (["--bogus"], "unknown flag: --bogus")])
def test_quickstart_usage_errors_stop_before_any_set_up(tmp_path, args, needle):
  # Run from a copy of the script alone: a mistake must stop it before its
  # first step (the set-up would need experiments/setup.sh beside it).
  script = tmp_path / "experiments" / "quickstart.sh"
  script.parent.mkdir()
  script.write_text((ROOT / "experiments/quickstart.sh").read_text())
  out = subprocess.run(["bash", str(script), *args], capture_output=True,
                       text=True, cwd=tmp_path)
  assert out.returncode == 2, out
  assert out.stderr.strip().splitlines() == [f"{needle} (see --help)"]
  assert out.stdout == "" and sorted(p.name for p in tmp_path.iterdir()) == [
      "experiments"]


def test_quickstart_help_is_its_header_comment():
  out = subprocess.run(["bash", str(ROOT / "experiments/quickstart.sh"),
                        "--help"], capture_output=True, text=True)
  assert out.returncode == 0
  lines = out.stdout.splitlines()
  assert "--minutes N" in lines[2] and all(l.startswith("#") for l in lines)
