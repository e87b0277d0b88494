"""Two processes on localhost train the same steps as one process.

Each child process gets 4 fake CPU devices; the two join with
``jax.distributed.initialize`` (a local coordinator, gloo CPU collectives)
into one 8-device mesh data=2 x fsdp=2 x tensor=2, every process feeding
its own half of each global batch. A third, single process with 1 device
trains on the whole batches. Losses and params must agree.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from train.batches import SyntheticBatches

pytestmark = pytest.mark.slow  # child processes that compile

NUM_STEPS = 4


def _worker(out_dir: str, process_id: int, num_processes: int, port: int):
  import jax
  from jax.experimental import multihost_utils
  from experiments.configs import tiny
  from model import TransformerConfig
  from train import sharding, trainer

  config = tiny.get_config()
  if num_processes > 1:
    config.distributed.update(dict(
        enabled=True, coordinator_address=f"localhost:{port}",
        num_processes=num_processes, process_id=process_id,
        cpu_collectives="gloo"))
    config.mesh.update(dict(data=-1, fsdp=2, tensor=2))
  else:
    config.mesh.update(dict(data=1, fsdp=1, tensor=1))
  sharding.maybe_initialize_distributed(config.distributed)
  assert jax.process_count() == num_processes
  devices = jax.devices() if num_processes > 1 else jax.devices()[:1]
  model_config = TransformerConfig.preset("tiny")
  runner = trainer.make_runner(config, model_config, devices=devices)
  data = SyntheticBatches(16, 32, model_config.vocab_size, seed=5,
                          process_index=jax.process_index(),
                          process_count=jax.process_count())
  state = runner.init_state(jax.random.key(0))
  rng = jax.random.key(1)
  losses = []
  for _ in range(NUM_STEPS):
    state, metrics = runner.train_step(state, runner.place_batch(next(data)),
                                       rng)
    losses.append(float(metrics["loss"]))
  params = multihost_utils.process_allgather(state.params, tiled=True)
  if jax.process_index() == 0:
    flat = {"/".join(str(k.key) for k in path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
    np.savez(os.path.join(out_dir, f"run{num_processes}.npz"),
             losses=np.array(losses), **flat)
  if num_processes > 1:
    jax.distributed.shutdown()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_agree_with_one(tmp_path):
  port = _free_port()
  env4 = dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS=os.environ.get("XLA_FLAGS", "")
              + " --xla_force_host_platform_device_count=4")
  env1 = dict(os.environ, JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen(
      [sys.executable, __file__, str(tmp_path), str(pid), "2", str(port)],
      env=env4, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for pid in (0, 1)]
  procs.append(subprocess.Popen(
      [sys.executable, __file__, str(tmp_path), "0", "1", "0"], env=env1,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  try:
    for proc in procs:
      _, err = proc.communicate(timeout=400)
      assert proc.returncode == 0, err[-4000:]
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  two = dict(np.load(tmp_path / "run2.npz"))
  one = dict(np.load(tmp_path / "run1.npz"))
  np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5)
  assert set(two) == set(one) and len(one) > 20
  for key in one:
    if key.endswith("key/bias"):  # zero true gradient: see test_sharding.py
      assert np.abs(two[key]).max() < 1e-2
      continue
    np.testing.assert_allclose(two[key], one[key], rtol=1e-5, atol=1e-6,
                               err_msg=key)


if __name__ == "__main__":
  _worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
