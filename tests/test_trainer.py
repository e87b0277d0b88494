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


def test_steps_in_budget_by_hand():
  from train import trainer
  # 100 s, 5 s of them compiling: 95 s at 0.5 s a step plus a 10 s
  # validation pass every 20 steps (0.5 s a step more) = 95 steps.
  assert trainer.steps_in_budget(100.0, 0.5, 10.0, 20, 5.0, margin=0.0) == 95
  # 3% kept back: 97 - 5 = 92 s -> 92 steps; no evaluation: 184.
  assert trainer.steps_in_budget(100.0, 0.5, 10.0, 20, 5.0, margin=0.03) == 92
  assert trainer.steps_in_budget(100.0, 0.5, 10.0, 0, 5.0, margin=0.03) == 184
  # A budget already spent holds no step.
  assert trainer.steps_in_budget(-3.0, 0.5, 10.0, 20, 5.0) == 0


def test_the_budget_keeps_back_the_final_evaluation():
  import time
  from train import trainer
  # 60 s budget, 50 s used: 10 s left.
  stop = trainer.StopRequest(1.0, time.time() - 50.0)
  assert not stop.requested(at_log_step=True)
  stop.reserve = 8.0    # a validation pass of 8 s still fits
  assert not stop.requested(at_log_step=True)
  stop.reserve = 12.0   # one of 12 s does not: stop now
  assert stop.requested(at_log_step=True)
  assert not trainer.StopRequest(0.0, time.time() - 1e6).requested(True)


def test_budget_timing_must_end_inside_the_warmup():
  from model import ConfigError
  from train import trainer
  from experiments.configs import bible_es_en
  config = bible_es_en.get_config()
  config.max_minutes = 30.0
  assert not trainer.plans_steps_from_time(config)  # rsqrt: nothing to plan
  config.optimizer.schedule = "linear"
  assert trainer.plans_steps_from_time(config)
  trainer.check_budget_timing(config)  # 20 timed steps, warm-up 150
  config.budget_timing_steps = 150
  with pytest.raises(ConfigError, match="budget_timing_steps=150.*1 to 149"):
    trainer.check_budget_timing(config)
  config.optimizer.decay_steps = 910  # a fixed length: nothing to plan
  assert not trainer.plans_steps_from_time(config)


def test_dropout_for_length_by_hand():
  from model import ConfigError
  from experiments.configs import bible_es_en
  from train import trainer
  config = bible_es_en.get_config()
  assert (config.long_run_steps, config.long_run_dropout_rate) == (2750, 0.1)
  assert config.model.dropout_rate == 0.0
  assert trainer.dropout_for_length(config, 2749) == 0.0
  assert trainer.dropout_for_length(config, 2750) == 0.1
  config.long_run_steps = 0   # never
  assert trainer.dropout_for_length(config, 10**6) == 0.0
  # Only a budget leaves the length open, and only where it could reach
  # long_run_steps and the rate would change.
  config.long_run_steps = 2750
  assert not trainer.decides_dropout_from_time(config)   # no max_minutes
  config.max_minutes = 30.0
  assert trainer.decides_dropout_from_time(config)
  config.num_train_steps = 2000
  assert not trainer.decides_dropout_from_time(config)
  config.num_train_steps, config.model.dropout_rate = 100_000, 0.1
  assert not trainer.decides_dropout_from_time(config)
  # None: the preset's rate (small: 0.1), the same as the long run's.
  config.model.dropout_rate = None
  assert trainer.configured_dropout(config) == 0.1
  assert trainer.dropout_for_length(config, 10) == 0.1
  assert not trainer.decides_dropout_from_time(config)
  # Refused before any work: a budget that would fix a decaying schedule's
  # length from steps timed at the other rate, no step to time, bad values.
  config.model.dropout_rate = 0.0
  trainer.check_long_run(config)
  config.optimizer.schedule = "linear"
  with pytest.raises(ConfigError, match="long_run_steps=2750 with a linear"):
    trainer.check_long_run(config)
  config.optimizer.decay_steps = 3000   # a fixed length: the dropout alone
  trainer.check_long_run(config)
  config.budget_timing_steps = 0
  with pytest.raises(ConfigError, match="budget_timing_steps=0"):
    trainer.check_long_run(config)
  config.long_run_steps = -1
  with pytest.raises(ConfigError, match="long_run_steps=-1"):
    trainer.check_long_run(config)
  config.long_run_steps, config.long_run_dropout_rate = 2750, 1.0
  with pytest.raises(ConfigError, match=r"long_run_dropout_rate=1.0"):
    trainer.check_long_run(config)


def test_a_budget_long_enough_turns_the_long_run_dropout_on(tmp_path):
  # Dropout 0 while steps 2-4 are timed; the 60-minute budget holds far
  # more than long_run_steps=8, so dropout 0.1 from step 5 on. The same run
  # built another way: 4 steps with no budget and dropout 0 (12 steps would
  # reach long_run_steps: 4 do not), resumed to a 12-step length, which
  # does (dropout 0.1 from its first step, 5).
  common = {"synthetic_data": True, "log_every_steps": 1,
            "eval_every_steps": 10**6, "num_eval_batches": 1,
            "checkpoint_every_steps": 10**6, "budget_timing_steps": 3,
            "model.dropout_rate": 0.0, "long_run_steps": 8,
            "long_run_dropout_rate": 0.1}
  timed, built = tmp_path / "timed", tmp_path / "built"
  a = _start(timed, max_minutes=60, num_train_steps=12, **common)
  b = _start(built, num_train_steps=4, **common)
  (rc_a, out_a, err_a), (rc_b, _, err_b) = _finish(a), _finish(b)
  assert rc_a == 0, err_a[-3000:]
  assert rc_b == 0, err_b[-3000:]
  assert "timing steps 2-4 to choose the dropout" in out_a
  assert re.search(r"the budget holds ~\d+ steps at dropout 0, so dropout "
                   r"0.1 from step 5 \(a run of long_run_steps=8 or more\)",
                   out_a), out_a
  assert json.loads((timed / "config.json").read_text())["model"][
      "dropout_rate"] == 0.1
  assert json.loads((built / "config.json").read_text())["model"][
      "dropout_rate"] == 0.0
  rc, out, err = _finish(_start(built, num_train_steps=12, **common))
  assert rc == 0, err[-3000:]
  assert ("Dropout 0.1 from step 5 (the checkpoint of step 4 trained with 0; "
          "long_run_steps=8)") in out
  assert json.loads((built / "config.json").read_text())["model"][
      "dropout_rate"] == 0.1
  losses = _train_losses(timed)
  assert sorted(losses) == list(range(1, 13))
  assert losses == _train_losses(built)
  # A long run resumed under a budget keeps its dropout: nothing to time.
  rc, out, err = _finish(_start(timed, max_minutes=60, num_train_steps=14,
                                **common))
  assert rc == 0, err[-3000:]
  assert "Dropout 0.1: the checkpoint of step 12 trained with" in out
  assert "timing steps" not in out
  assert sorted(_train_losses(timed)) == list(range(1, 15))
  # Dropout changed the steps after 4: a run without it parts from them.
  plain = tmp_path / "plain"
  rc, _, err = _finish(_start(plain, num_train_steps=5,
                              **dict(common, long_run_steps=0)))
  assert rc == 0, err[-3000:]
  without = _train_losses(plain)
  assert all(without[s] == losses[s] for s in range(1, 5))
  assert without[5] != losses[5]


def test_budget_fixes_the_step_count_of_a_decaying_schedule(tmp_path):
  # A linear schedule with a 60-minute budget times steps 2-4 (inside the
  # 6-step warm-up) and a validation pass, then fixes the step count: here
  # num_train_steps (12) caps it. Until then the run trained with a decay
  # too long to reach; every step must equal a run launched with 12 steps.
  common = {"synthetic_data": True, "log_every_steps": 1,
            "eval_every_steps": 10**6, "num_eval_batches": 1,
            "checkpoint_every_steps": 10**6, "optimizer.schedule": "linear",
            "optimizer.warmup_steps": 6, "budget_timing_steps": 3,
            "num_train_steps": 12}
  planned, fixed = tmp_path / "planned", tmp_path / "fixed"
  a = _start(planned, max_minutes=60, **common)
  b = _start(fixed, **common)
  (rc_a, out_a, err_a), (rc_b, _, err_b) = _finish(a), _finish(b)
  assert rc_a == 0, err_a[-3000:]
  assert rc_b == 0, err_b[-3000:]
  assert "timing steps 2-4" in out_a
  match = re.search(r"the budget holds (\d+) steps, num_train_steps caps the "
                    r"run at 12; the linear schedule ends at step 12", out_a)
  assert match and int(match[1]) > 12, out_a[-2000:]
  record = json.loads((planned / "config.json").read_text())
  assert record["num_train_steps"] == record["optimizer"]["decay_steps"] == 12

  from train import metrics
  def per_step(workdir, key):
    return {r["step"]: r[key] for r in metrics.read_metrics(workdir)
            if key in r}
  for key in ("train_loss", "learning_rate"):
    assert per_step(planned, key) == per_step(fixed, key), key
  assert sorted(per_step(planned, "train_loss")) == list(range(1, 13))
  lrs = per_step(planned, "learning_rate")
  assert max(lrs, key=lrs.get) in (5, 6, 7) and lrs[12] < lrs[6] / 4

  # A second launch keeps the fixed length: nothing left to train.
  rc, out, err = _finish(_start(planned, max_minutes=60, **common))
  assert rc == 0, err[-3000:]
  assert "fixed at 12 steps by the budget of its first launch" in out
  assert "it has trained them all" in out
  assert sorted(per_step(planned, "train_loss")) == list(range(1, 13))


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
