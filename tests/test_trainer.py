"""The training loop end to end: exact resume, SIGTERM, NaN, incompatible config.

Runs go through ``python -m train`` in child processes (the process exit
between the two halves of a resumed run is real), on the `tiny` config and
a small generated parallel corpus read by the real input pipeline (Grain
iterator state included), or on synthetic batches where data does not matter.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from experiments import configs

pytestmark = pytest.mark.slow  # child processes that compile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "experiments", "configs", "tiny.py")
# tests/conftest.py set the fast-compile XLA flags every child inherits.
ENV = dict(os.environ, JAX_PLATFORMS="cpu")

WORDS = {"el": "the", "perro": "dog", "gato": "cat", "come": "eats",
         "bebe": "drinks", "agua": "water", "pan": "bread", "casa": "house",
         "grande": "big", "rojo": "red", "niño": "child", "ve": "sees",
         "y": "and", "una": "a", "luz": "light", "dios": "god"}


def _write_corpus(directory, n_train=400, n_eval=24):
  rng = np.random.default_rng(0)
  es = list(WORDS)
  paths = {}
  for split, n in (("train", n_train), ("eval", n_eval)):
    lines = []
    for _ in range(n):
      words = rng.choice(es, size=rng.integers(3, 9))
      lines.append(" ".join(words).capitalize() + ".\t" +
                   " ".join(WORDS[w] for w in words).capitalize() + ".")
    paths[split] = os.path.join(directory, f"{split}.tsv")
    with open(paths[split], "w", encoding="utf-8") as f:
      f.write("\n".join(lines) + "\n")
  return paths


def _flags(workdir, **overrides):
  args = [sys.executable, "-m", "train", f"--config={TINY}",
          f"--workdir={workdir}"]
  return args + [f"--config.{k}={v}" for k, v in overrides.items()]


def _start(workdir, **overrides):
  return subprocess.Popen(_flags(workdir, **overrides), cwd=ROOT, env=ENV,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def _checksums(workdir) -> dict[str, str]:
  """sha256 of every file under workdir (what "unchanged" means)."""
  import hashlib
  return {str(p.relative_to(workdir)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(workdir.rglob("*")) if p.is_file()}


def _finish(proc, timeout=300):
  out, err = proc.communicate(timeout=timeout)
  return proc.returncode, out, err


def _train_losses(workdir):
  from train import metrics
  return {r["step"]: r["train_loss"] for r in metrics.read_metrics(workdir)
          if "train_loss" in r}


@pytest.fixture(scope="module")
def corpus_overrides(tmp_path_factory):
  directory = tmp_path_factory.mktemp("corpus")
  paths = _write_corpus(str(directory))
  return {"data.name": "parallel_text", "data.train_tsv_file": paths["train"],
          "data.eval_tsv_file": paths["eval"], "data.vocab_size": 96,
          "log_every_steps": 1, "eval_every_steps": 10,
          "checkpoint_every_steps": 10, "num_eval_batches": 1}


def test_exact_resume_after_process_exit(tmp_path, corpus_overrides):
  from ml_collections import ConfigDict
  from train import checkpointing, inference, input_pipeline
  # One tokenizer for both runs (copied into each workdir).
  data = ConfigDict(dict(configs.data_config()))
  for key, value in corpus_overrides.items():
    if key.startswith("data."):
      data[key[5:]] = value
  input_pipeline.train_or_load_tokenizer(data, str(tmp_path / "tok"))
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  for workdir in (straight, resumed):
    shutil.copytree(tmp_path / "tok" / "tokenizer", workdir / "tokenizer")

  a = _start(straight, num_train_steps=20, **corpus_overrides)
  b = _start(resumed, num_train_steps=10, **corpus_overrides)
  for proc in (a, b):
    rc, out, err = _finish(proc)
    assert rc == 0, err[-3000:]
  assert checkpointing.complete_steps(checkpointing.checkpoint_dir(resumed)) == [10]
  rc, out, err = _finish(_start(resumed, num_train_steps=20, **corpus_overrides))
  assert rc == 0, err[-3000:]
  assert "Resuming from step 10" in out

  losses_a, losses_b = _train_losses(straight), _train_losses(resumed)
  assert sorted(losses_a) == sorted(losses_b) == list(range(1, 21))
  # Bitwise: same program, same data order, same dropout masks (the step's
  # key is fold_in(rng, step)), state restored exactly from float32 files.
  assert [losses_a[s] for s in range(1, 21)] == [losses_b[s] for s in range(1, 21)]
  assert losses_a[20] < losses_a[1]
  _, _, params_a, _ = inference.load_params(straight, 20)
  _, _, params_b, _ = inference.load_params(resumed, 20)
  import jax
  jax.tree.map(np.testing.assert_array_equal, params_a, params_b)

  # The workdir is self-contained: tokenizer, config, metrics, checkpoints.
  for name in ("tokenizer/spm.model", "config.json", "metrics.jsonl",
               "tensorboard", "checkpoints/20/state", "checkpoints/20/data"):
    assert (resumed / name).exists(), name
  assert json.loads((resumed / "config.json").read_text())["num_train_steps"] == 20

  # Rerunning with a different model in the same workdir is refused (a usage
  # mistake, exit 2), naming the field, and changes nothing in the workdir.
  before = _checksums(resumed)
  rc, out, err = _finish(_start(resumed, num_train_steps=30,
                                **{"model.d_model": 64, **corpus_overrides}))
  assert rc == 2, err[-3000:]
  assert err.startswith("error: ") and "Traceback" not in err
  assert "model.d_model: checkpoint 32, config 64" in err
  assert _checksums(resumed) == before


def test_sigterm_saves_and_exits_and_nan_stops(tmp_path):
  synthetic = {"synthetic_data": True, "log_every_steps": 5,
               "eval_every_steps": 10**6, "num_eval_batches": 1}
  term_dir, nan_dir = tmp_path / "term", tmp_path / "nan"
  term = _start(term_dir, num_train_steps=10**6, checkpoint_every_steps=10**6,
                **synthetic)
  # A learning rate 1e12 times too large: the loss overflows within steps.
  nan = _start(nan_dir, num_train_steps=50, checkpoint_every_steps=1,
               **{"optimizer.learning_rate_scale": 1e12, **synthetic,
                  "log_every_steps": 1})
  try:
    deadline = time.time() + 240
    while time.time() < deadline:
      steps = _train_losses(term_dir)
      if steps and max(steps) >= 30:
        break
      assert term.poll() is None, term.communicate()[1][-3000:]
      time.sleep(0.2)
    term.send_signal(signal.SIGTERM)
    rc, out, err = _finish(term, timeout=120)
  finally:
    if term.poll() is None:
      term.kill()
  from train import checkpointing, inference
  assert rc == 0, err[-3000:]
  stopped = int(re.search(r"Stopping at step (\d+) on signal SIGTERM", out)[1])
  assert stopped >= 30
  assert checkpointing.complete_steps(checkpointing.checkpoint_dir(term_dir)) == [stopped]
  assert max(_train_losses(term_dir)) == stopped

  rc, out, err = _finish(nan)
  assert rc == 1, (out[-2000:], err[-2000:])
  match = re.search(r"NonFiniteLossError: the training loss is (nan|inf|-inf) "
                    r"at step (\d+).*Last good checkpoint: step (\d+) in "
                    r"(\S+)\.", err)
  assert match, err[-3000:]
  bad, good = int(match[2]), int(match[3])
  assert good == bad - 1
  # Nothing was saved after the NaN; the last good checkpoint restores.
  assert max(checkpointing.complete_steps(checkpointing.checkpoint_dir(nan_dir))) == good
  _, _, params, _ = inference.load_params(nan_dir, good)
  import jax
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_an_unwritable_workdir_is_a_config_error(tmp_path):
  from model import ConfigError
  from train import trainer
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  config = configs.base_config()
  config.synthetic_data = True
  with pytest.raises(ConfigError, match=r"--workdir=.*a_file/run: cannot "
                     r"create it .*pass a directory you can write"):
    trainer.train_and_evaluate(config, str(blocker / "run"))
