"""Same numbers on 1 device, mesh data=8, data=2 x fsdp=2 x tensor=2, pmap on 8.

The placements run in a child process with 8 fake CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=8 must be set before jax
initialises, so not in this pytest process). The child trains five steps of
the `tiny` model in each placement, writes losses, params and the params'
shardings to an .npz / .json, and the tests here compare them.

Dropout: the jit placements use dropout (jax's partitionable threefry draws
the same bits whatever the sharding). Under pmap each device draws its own
mask for its rows, which cannot equal one device's mask for the whole batch,
so the pmap comparison is against a 1-device run with dropout 0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from train.batches import SyntheticBatches

pytestmark = pytest.mark.slow  # child processes that compile

NUM_STEPS = 5


def _worker(out_dir: str) -> None:
  import jax
  from experiments.configs import tiny
  from model import TransformerConfig
  from train import trainer

  assert jax.device_count() == 8, jax.devices()

  initial = {}

  def run(mesh=None, parallelism="jit", dropout=0.1, devices=None):
    config = tiny.get_config()
    config.parallelism = parallelism
    if mesh:
      config.mesh.update(mesh)
    model_config = TransformerConfig.preset("tiny", dropout_rate=dropout)
    runner = trainer.make_runner(config, model_config, devices=devices)
    data = SyntheticBatches(batch_size=16, max_len=32,
                            vocab_size=model_config.vocab_size, seed=3)
    if not initial:  # one compiled init; every placement starts from it
      initial["state"] = jax.device_get(runner.init_state(jax.random.key(0)))
    state = runner.place_state(initial["state"])
    rng = jax.random.key(1)
    losses = []
    for _ in range(NUM_STEPS):
      state, metrics = runner.train_step(state, runner.place_batch(next(data)),
                                         rng)
      losses.append(float(metrics["loss"]))
    params = runner.host_params(state.params)
    return runner, np.array(losses), params

  results, layouts = {}, {}
  one = [jax.devices()[0]]
  for name, kwargs in [
      ("one", dict(mesh=dict(data=1, fsdp=1, tensor=1), devices=one)),
      ("data8", dict(mesh=dict(data=8, fsdp=1, tensor=1))),
      ("d2f2t2", dict(mesh=dict(data=2, fsdp=2, tensor=2))),
      ("one_nodrop", dict(mesh=dict(data=1, fsdp=1, tensor=1), devices=one,
                          dropout=0.0)),
      ("pmap8", dict(parallelism="pmap", dropout=0.0)),
  ]:
    runner, losses, params = run(**kwargs)
    results[f"{name}/losses"] = losses
    flat = {"/".join(str(k.key) for k in path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
    for key, leaf in flat.items():
      results[f"{name}/params/{key}"] = np.asarray(jax.device_get(leaf))
    if name == "d2f2t2":
      layouts = {key: {"spec": [list(a) if isinstance(a, tuple) else a
                                for a in leaf.sharding.spec],
                       "mesh": dict(leaf.sharding.mesh.shape),
                       "shape": list(leaf.shape),
                       "shard_shape": list(leaf.addressable_shards[0].data.shape)}
                 for key, leaf in flat.items()}
  np.savez(os.path.join(out_dir, "results.npz"), **results)
  with open(os.path.join(out_dir, "layouts.json"), "w") as f:
    json.dump(layouts, f)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  out = tmp_path_factory.mktemp("sharding")
  env = dict(os.environ,
             XLA_FLAGS=os.environ.get("XLA_FLAGS", "")
             + " --xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, __file__, str(out)], env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-5000:]
  data = dict(np.load(out / "results.npz"))
  layouts = json.loads((out / "layouts.json").read_text())
  return data, layouts


def _by_run(data, run):
  prefix = f"{run}/params/"
  return {k[len(prefix):]: v for k, v in data.items() if k.startswith(prefix)}


@pytest.mark.parametrize("run,reference", [
    ("data8", "one"), ("d2f2t2", "one"), ("pmap8", "one_nodrop")])
def test_same_losses_and_params(results, run, reference):
  data, _ = results
  np.testing.assert_allclose(data[f"{run}/losses"], data[f"{reference}/losses"],
                             rtol=1e-5)
  ref, got = _by_run(data, reference), _by_run(data, run)
  assert set(got) == set(ref) and len(ref) > 20
  for key in ref:
    if key.endswith("key/bias"):
      # A key bias adds q.b to every score of a query: softmax is invariant,
      # so its true gradient is exactly 0 and Adam (eps 1e-9) turns float
      # rounding noise into +-lr steps. Only check it stays that small.
      assert np.abs(got[key]).max() < 1e-2, key
      continue
    # Summing the batch in another order (8 shards vs 1) changes the float
    # rounding. Two things magnify it: Adam divides each coordinate's update
    # by that coordinate's own gradient scale (near-zero gradients, e.g. the
    # key kernels' direction common to all keys, become ~lr-sized noise), and
    # a ReLU unit whose input sits at 0 for some token can switch sides
    # (seen: one d_ff unit, ~6% of one step). atol 2e-4 is ~10% of one step
    # here (lr <= 2e-3); the losses above must still agree to rtol 1e-5.
    np.testing.assert_allclose(got[key], ref[key], rtol=1e-5, atol=2e-4,
                               err_msg=key)
  # The runs really trained: params moved away from the start.
  assert data[f"{run}/losses"][-1] < data[f"{run}/losses"][0]


def test_params_laid_out_by_rules(results):
  _, layouts = results
  emb = layouts["shared_embedding/embedding"]   # (vocab, embed)
  assert emb["spec"] == ["tensor", "fsdp"]
  assert emb["shard_shape"] == [emb["shape"][0] // 2, emb["shape"][1] // 2]
  q = layouts["encoder/layers_0/self_attention/query/kernel"]  # embed,heads,kv
  assert q["spec"][:2] == ["fsdp", "tensor"] and q["spec"][2:] in ([], [None])
  assert q["shard_shape"] == [q["shape"][0] // 2, q["shape"][1] // 2,
                              q["shape"][2]]
  wi = layouts["decoder/layers_1/ffn/wi/kernel"]                # embed, mlp
  assert wi["spec"] == ["fsdp", "tensor"]
  wo = layouts["decoder/layers_1/ffn/wo/kernel"]                # mlp, embed
  assert wo["spec"] == ["tensor", "fsdp"]
  norm = layouts["encoder/layers_0/ffn_norm/scale"]             # embed
  assert norm["spec"] == ["fsdp"]
  assert all(v["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
             for v in layouts.values())


if __name__ == "__main__":
  _worker(sys.argv[1])
