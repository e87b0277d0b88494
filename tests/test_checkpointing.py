"""train/checkpointing.py: restore onto other meshes, SIGKILL mid-save, config checks.

No train step is compiled here: states are filled with random numbers of the
right shapes (``Runner.abstract_state``), so these tests are about the
checkpoints themselves.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from train import inference, trainer


def _random_state(runner, seed=0):
  """A host TrainState of the runner's shapes with random contents."""
  import jax
  rng = np.random.default_rng(seed)
  abstract = runner.abstract_state()
  return jax.tree.map(
      lambda a: (rng.normal(size=a.shape).astype(a.dtype)
                 if np.issubdtype(a.dtype, np.floating)
                 else np.full(a.shape, 3, a.dtype)), abstract)


def _config(mesh=None, preset="tiny"):
  from experiments.configs import tiny
  config = tiny.get_config()
  config.model_preset = preset
  if mesh:
    config.mesh.update(mesh)
  config.checkpoint.async_save = True
  return config


# ------------------------------------------------ restore onto other meshes

def _mesh_worker(workdir: str) -> None:
  import jax
  from model import TransformerConfig
  from train import checkpointing
  assert jax.device_count() == 8
  model_config = TransformerConfig.preset("tiny")
  config = _config(dict(data=2, fsdp=2, tensor=2))
  runner8 = trainer.make_runner(config, model_config)
  host = _random_state(runner8)
  state = runner8.place_state(host)
  ckpt = checkpointing.Checkpointer(workdir, config.checkpoint)
  record = checkpointing.config_record(config, model_config)
  ckpt.save(7, state, None, record, metrics={"eval_loss": 1.5})
  ckpt.wait()
  ckpt.close()
  report = {}
  for name, mesh, devices in [("one", dict(data=1, fsdp=1, tensor=1),
                               jax.devices()[:1]),
                              ("d2f4", dict(data=2, fsdp=4, tensor=1), None)]:
    runner = trainer.make_runner(_config(mesh), model_config, devices=devices)
    reader = checkpointing.Checkpointer(workdir, _config(mesh).checkpoint)
    restored = reader.restore(7, runner.abstract_state())
    reader.close()
    same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), b)),
                        restored, host)
    emb = restored.params["shared_embedding"]["embedding"]
    report[name] = {"all_equal": all(jax.tree.leaves(same)),
                    "step": int(restored.step),
                    "mesh": dict(emb.sharding.mesh.shape),
                    "spec": [a if not isinstance(a, tuple) else list(a)
                             for a in emb.sharding.spec],
                    "shard_shape": list(emb.addressable_shards[0].data.shape)}
  with open(os.path.join(workdir, "report.json"), "w") as f:
    json.dump(report, f)


@pytest.mark.slow
def test_save_on_8_devices_restore_on_1_and_2x4(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=os.environ.get("XLA_FLAGS", "")
             + " --xla_force_host_platform_device_count=8")
  proc = subprocess.run([sys.executable, __file__, "mesh", str(tmp_path)],
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  report = json.loads((tmp_path / "report.json").read_text())
  assert report["one"]["all_equal"] and report["d2f4"]["all_equal"]
  assert report["one"]["step"] == report["d2f4"]["step"] == 3
  assert report["one"]["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
  assert report["d2f4"]["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
  # embedding [vocab 64, embed 32]: (tensor, fsdp) -> 32 / 4 on the 2x4 mesh
  assert report["d2f4"]["spec"] == ["tensor", "fsdp"]
  assert report["d2f4"]["shard_shape"] == [64, 8]
  # Inference users get params only, on one device, from the same files.
  from train import checkpointing
  assert checkpointing.complete_steps(checkpointing.checkpoint_dir(tmp_path)) == [7]
  model_config, experiment, params, _ = inference.load_params(
      tmp_path, "best")
  assert model_config.d_model == 32 and experiment["model_preset"] == "tiny"
  assert params["shared_embedding"]["embedding"].shape == (64, 32)
  assert len(params["shared_embedding"]["embedding"].devices()) == 1


# ------------------------------------------------ SIGKILL during an async save

def _kill_worker(workdir: str) -> None:
  """Saves step 1, starts an async save of step 2 and waits to be killed."""
  from model import TransformerConfig
  from train import checkpointing
  model_config = TransformerConfig.preset("small")  # ~40 MB of state
  config = _config(dict(data=1, fsdp=1, tensor=1), preset="small")
  runner = trainer.make_runner(config, model_config)
  record = checkpointing.config_record(config, model_config)
  ckpt = checkpointing.Checkpointer(workdir, config.checkpoint)
  ckpt.save(1, runner.place_state(_random_state(runner, 1)), None, record)
  ckpt.wait()
  # Hold the save of step 2 at its last act, the rename of its temporary
  # directory, so that the kill always lands mid-save however slow or fast
  # this machine is.
  import asyncio  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top

  async def held(*_, **__):
    await asyncio.sleep(3600)
  atomicity.AtomicRenameTemporaryPath.finalize = held
  state2 = runner.place_state(_random_state(runner, 2))
  ckpt.save(2, state2, None, record)
  temporary = ckpt.directory / "2.orbax-checkpoint-tmp"
  deadline = time.time() + 60
  while not temporary.exists() and time.time() < deadline:
    time.sleep(0.05)
  print("SAVING 2", flush=True)
  time.sleep(120)


@pytest.mark.slow
def test_sigkill_during_async_save_keeps_previous_checkpoint(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  child = subprocess.Popen([sys.executable, __file__, "kill", str(tmp_path)],
                           env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True)
  try:
    line = child.stdout.readline()
    assert line.strip() == "SAVING 2", line
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL
  finally:
    if child.poll() is None:
      child.kill()
  from model import TransformerConfig
  from train import checkpointing
  ckpt_dir = tmp_path / "checkpoints"
  leftovers = [p.name for p in ckpt_dir.iterdir() if not p.name.isdigit()]
  # The interrupted save of step 2 never became a checkpoint.
  assert checkpointing.complete_steps(checkpointing.checkpoint_dir(tmp_path)) == [1], sorted(
      p.name for p in ckpt_dir.iterdir())
  # ... and the kill did hit it mid-save (its temporary directory is there).
  assert "2.orbax-checkpoint-tmp" in leftovers, leftovers
  # A resumed run restores step 1 intact ...
  config = _config(dict(data=1, fsdp=1, tensor=1), preset="small")
  model_config = TransformerConfig.preset("small")
  runner = trainer.make_runner(config, model_config)
  ckpt = checkpointing.Checkpointer(tmp_path, config.checkpoint)
  assert ckpt.latest_step() == 1
  restored = ckpt.restore(1, runner.abstract_state())
  expected = _random_state(runner, 1)
  np.testing.assert_array_equal(
      np.asarray(restored.params["shared_embedding"]["embedding"]),
      expected.params["shared_embedding"]["embedding"])
  # ... and can save step 2 again.
  ckpt.save(2, restored, None,
            checkpointing.config_record(config, model_config))
  ckpt.wait()
  ckpt.close()
  assert checkpointing.complete_steps(checkpointing.checkpoint_dir(tmp_path)) == [1, 2]


# ------------------------------------------------ config compatibility

def test_incompatible_config_names_the_fields(tmp_path):
  from model import TransformerConfig
  from train import checkpointing
  config = _config()
  model_config = TransformerConfig.preset("tiny")
  saved = checkpointing.config_record(config, model_config)
  ckpt = checkpointing.Checkpointer(tmp_path, config.checkpoint)
  ckpt.manager.save(5, args=checkpointing.ocp.args.Composite(**{
      checkpointing.CONFIG: checkpointing.ocp.args.JsonSave(saved)}))
  ckpt.wait()
  # Compatible changes (learning rate, steps) only warn.
  other = _config()
  other.num_train_steps = 999
  other.optimizer.learning_rate_scale = 3.0
  checkpointing.check_compatible(
      ckpt, 5, checkpointing.config_record(other, model_config))
  # So do the dropout rates: no param or state depends on them.
  fatal, changes = checkpointing.compare_configs(
      saved, checkpointing.config_record(config, model_config.replace(
          dropout_rate=0.3, attention_dropout_rate=0.2,
          dropout_impl="paired_bits")))
  assert fatal == []
  assert [c.split(":")[0] for c in changes] == [
      "model.attention_dropout_rate", "model.dropout_impl",
      "model.dropout_rate"]
  bad = _config()
  bad.optimizer.grad_accum_steps = 4
  with pytest.raises(checkpointing.IncompatibleCheckpointError) as error:
    checkpointing.check_compatible(ckpt, 5, checkpointing.config_record(
        bad, model_config.replace(d_model=64, num_heads=8)))
  message = str(error.value)
  assert "model.d_model: checkpoint 32, config 64" in message
  assert "model.num_heads: checkpoint 4, config 8" in message
  assert "optimizer.grad_accum_steps: checkpoint 1, config 4" in message
  assert "learning_rate" not in message
  # A model field added after the checkpoint was written, at its default,
  # does not block resuming.
  old = dict(saved, model={k: v for k, v in saved["model"].items()
                           if k != "pre_ln"})
  fatal, _ = checkpointing.compare_configs(old, saved)
  assert fatal == []
  ckpt.close()


def test_keeps_last_n_plus_best(tmp_path):
  from model import TransformerConfig
  from train import checkpointing
  config = _config(dict(data=1, fsdp=1, tensor=1))
  config.checkpoint.max_to_keep = 2
  config.checkpoint.keep_best = 1
  model_config = TransformerConfig.preset("tiny")
  runner = trainer.make_runner(config, model_config)
  record = checkpointing.config_record(config, model_config)
  ckpt = checkpointing.Checkpointer(tmp_path, config.checkpoint)
  losses = {1: 3.0, 2: 1.0, 3: 4.0, 4: None, 5: 6.0, 6: 5.0}
  for step, loss in losses.items():
    state = runner.place_state(_random_state(runner, step))
    ckpt.save(step, state, None, record,
              metrics=None if loss is None else {"eval_loss": loss})
    ckpt.wait()
  assert ckpt.all_steps() == [2, 5, 6]   # the best (2) + the last two
  assert ckpt.best_step() == 2
  ckpt.close()
  _, _, params, _ = inference.load_params(tmp_path, "best")
  np.testing.assert_array_equal(
      np.asarray(params["shared_embedding"]["embedding"]),
      _random_state(runner, 2).params["shared_embedding"]["embedding"])
  # Several steps' params, averaged as evaluation does.
  mean = inference.average_checkpoints(tmp_path, [5, 6])
  np.testing.assert_allclose(
      np.asarray(mean["shared_embedding"]["embedding"]),
      (_random_state(runner, 5).params["shared_embedding"]["embedding"] +
       _random_state(runner, 6).params["shared_embedding"]["embedding"]) / 2,
      rtol=1e-6)


def test_relative_workdir_saves_and_restores(tmp_path, monkeypatch):
  # `python -m train --workdir=runs/x` passes a relative path; Orbax itself
  # refuses relative paths for array data.
  from model import TransformerConfig
  from train import checkpointing
  monkeypatch.chdir(tmp_path)
  config = _config(dict(data=1, fsdp=1, tensor=1))
  model_config = TransformerConfig.preset("tiny")
  runner = trainer.make_runner(config, model_config)
  ckpt = checkpointing.Checkpointer("runs/relative", config.checkpoint)
  state = _random_state(runner, 7)
  ckpt.save(3, runner.place_state(state), None,
            checkpointing.config_record(config, model_config))
  ckpt.wait()
  ckpt.close()
  assert (tmp_path / "runs/relative/checkpoints/3/state").is_dir()
  _, _, params, _ = inference.load_params("runs/relative")
  np.testing.assert_array_equal(
      np.asarray(params["shared_embedding"]["embedding"]),
      state.params["shared_embedding"]["embedding"])


def test_best_metric_policy():
  from train import checkpointing
  config = _config()
  assert checkpointing.best_metric_and_mode(config.checkpoint, bleu=False) == (
      "eval_loss", "min")
  assert checkpointing.best_metric_and_mode(config.checkpoint, bleu=True) == (
      "eval_bleu", "max")


if __name__ == "__main__":
  {"mesh": _mesh_worker, "kill": _kill_worker}[sys.argv[1]](sys.argv[2])
