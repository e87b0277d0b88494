"""A wall-time budget planned before training (train/plan.py) and the rules
of a run's length (train/run_length.py): by hand, and end to end through
``python -m train --config.max_minutes=...`` and ``python -m train.plan``.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from test_trainer import ROOT, ENV, TINY, _finish, _start, _train_losses


def test_steps_in_budget_by_hand():
  from train import plan
  # 100 s, 5 s of them compiling: 95 s at 0.5 s a step plus a 10 s
  # validation pass every 20 steps (0.5 s a step more) = 95 steps.
  assert plan.steps_in_budget(100.0, 0.5, 10.0, 20, 5.0, margin=0.0) == 95
  # 3% kept back: 97 - 5 = 92 s -> 92 steps; no evaluation: 184.
  assert plan.steps_in_budget(100.0, 0.5, 10.0, 20, 5.0, margin=0.03) == 92
  assert plan.steps_in_budget(100.0, 0.5, 10.0, 0, 5.0, margin=0.03) == 184
  # A budget already spent holds no step.
  assert plan.steps_in_budget(-3.0, 0.5, 10.0, 20, 5.0) == 0
  # A 20 s BLEU pass every 40 steps (0.5 s a step more: 1.5 s a step) and
  # the final evaluation (10 + 20 s) kept back: (95 - 30) / 1.5 = 43.
  assert plan.steps_in_budget(100.0, 0.5, 10.0, 20, 5.0, margin=0.0,
                              bleu_seconds=20.0, bleu_every=40,
                              final_seconds=30.0) == 43


def test_budget_timing_must_end_inside_the_warmup():
  from model import ConfigError
  from train import run_length
  from experiments.configs import bible_es_en
  config = bible_es_en.get_config()
  config.max_minutes = 30.0
  assert not run_length.plans_steps_from_time(config)  # rsqrt: nothing to plan
  config.optimizer.schedule = "linear"
  assert run_length.plans_steps_from_time(config)
  run_length.check_budget_timing(config)  # 20 timed steps, warm-up 150
  config.budget_timing_steps = 150
  with pytest.raises(ConfigError, match="budget_timing_steps=150.*1 to 149"):
    run_length.check_budget_timing(config)
  config.optimizer.decay_steps = 910  # a fixed length: nothing to plan
  assert not run_length.plans_steps_from_time(config)


def test_dropout_for_length_by_hand():
  from model import ConfigError
  from experiments.configs import bible_es_en
  from train import run_length
  config = bible_es_en.get_config()
  assert (config.long_run_steps, config.long_run_dropout_rate) == (2750, 0.1)
  assert config.model.dropout_rate == 0.0
  assert run_length.dropout_for_length(config, 2749) == 0.0
  assert run_length.dropout_for_length(config, 2750) == 0.1
  config.long_run_steps = 0   # never
  assert run_length.dropout_for_length(config, 10**6) == 0.0
  # Only a budget leaves the length open, and only where it could reach
  # long_run_steps and the rate would change.
  config.long_run_steps = 2750
  assert not run_length.decides_dropout_from_time(config)   # no max_minutes
  config.max_minutes = 30.0
  assert run_length.decides_dropout_from_time(config)
  config.num_train_steps = 2000
  assert not run_length.decides_dropout_from_time(config)
  config.num_train_steps, config.model.dropout_rate = 100_000, 0.1
  assert not run_length.decides_dropout_from_time(config)
  # None: the preset's rate (small: 0.1), the same as the long run's.
  config.model.dropout_rate = None
  assert run_length.configured_dropout(config) == 0.1
  assert run_length.dropout_for_length(config, 10) == 0.1
  assert not run_length.decides_dropout_from_time(config)
  # Refused before any work: a budget that would fix a decaying schedule's
  # length from steps timed at the other rate, no step to time, bad values.
  config.model.dropout_rate = 0.0
  run_length.check_long_run(config)
  config.optimizer.schedule = "linear"
  with pytest.raises(ConfigError, match="long_run_steps=2750 with a linear"):
    run_length.check_long_run(config)
  config.optimizer.decay_steps = 3000   # a fixed length: the dropout alone
  run_length.check_long_run(config)
  config.budget_timing_steps = 0
  with pytest.raises(ConfigError, match="budget_timing_steps=0"):
    run_length.check_long_run(config)
  config.long_run_steps = -1
  with pytest.raises(ConfigError, match="long_run_steps=-1"):
    run_length.check_long_run(config)
  config.long_run_steps, config.long_run_dropout_rate = 2750, 1.0
  with pytest.raises(ConfigError, match=r"long_run_dropout_rate=1.0"):
    run_length.check_long_run(config)


def test_a_fixed_length_writes_out_its_dropout_and_schedule_end():
  from experiments.configs import bible_es_en
  from model import ConfigError
  from train import run_length
  config = bible_es_en.get_config()
  config.num_train_steps = 2750
  fixed = run_length.for_fixed_length(config)
  assert fixed.model.dropout_rate == 0.1 and config.model.dropout_rate == 0.0
  assert fixed.optimizer.decay_steps == 0   # rsqrt: no end
  config.num_train_steps, config.optimizer.schedule = 2749, "cosine"
  fixed = run_length.for_fixed_length(config)
  assert fixed.model.dropout_rate == 0.0
  assert fixed.optimizer.decay_steps == 2749
  config.optimizer.ema_decay = 1.5
  with pytest.raises(ConfigError, match="ema_decay=1.5"):
    run_length.for_fixed_length(config)


def test_a_budget_needs_a_step_to_time():
  from experiments.configs import bible_es_en
  from model import ConfigError
  from train import plan
  config = bible_es_en.get_config()
  config.max_minutes, config.long_run_steps = 30.0, 0
  plan.check_budget(config)
  config.budget_timing_steps = 0
  with pytest.raises(ConfigError, match="budget_timing_steps=0: with "
                     "--config.max_minutes the run times at least 1 step"):
    plan.check_budget(config)


@pytest.mark.slow  # python -m train child processes that compile
def test_a_budget_long_enough_turns_the_long_run_dropout_on(tmp_path):
  # The plan times 3 steps (after the compiling one) of a new model at
  # dropout 0; the 60-minute budget holds far more than long_run_steps=8,
  # so the run trains its 12 steps (num_train_steps caps it) at dropout 0.1,
  # the same run as one launched with 12 steps and no budget.
  common = {"synthetic_data": True, "log_every_steps": 1,
            "eval_every_steps": 10**6, "num_eval_batches": 1,
            "checkpoint_every_steps": 10**6, "budget_timing_steps": 3,
            "model.dropout_rate": 0.0, "long_run_steps": 8,
            "long_run_dropout_rate": 0.1}
  timed, fixed, built = tmp_path / "timed", tmp_path / "fixed", tmp_path / "built"
  a = _start(timed, max_minutes=60, num_train_steps=12, **common)
  b = _start(built, num_train_steps=4, **common)
  (rc_a, out_a, err_a), (rc_b, _, err_b) = _finish(a), _finish(b)
  assert rc_a == 0, err_a[-3000:]
  assert rc_b == 0, err_b[-3000:]
  assert "timing 3 steps after the compiling one" in out_a
  assert re.search(r"the budget holds ~\d+ steps at dropout 0, so dropout "
                   r"0.1 from step 1 \(a run of long_run_steps=8 or more\), "
                   r"num_train_steps caps the run at 12", out_a), out_a
  assert json.loads((timed / "config.json").read_text())["model"][
      "dropout_rate"] == 0.1
  assert json.loads((built / "config.json").read_text())["model"][
      "dropout_rate"] == 0.0
  rc, _, err = _finish(_start(fixed, num_train_steps=12, **common))
  assert rc == 0, err[-3000:]
  losses = _train_losses(timed)
  assert sorted(losses) == list(range(1, 13))
  assert losses == _train_losses(fixed)
  # A run that turns long on resume: dropout 0.1 from its next step.
  rc, out, err = _finish(_start(built, num_train_steps=12, **common))
  assert rc == 0, err[-3000:]
  assert ("Dropout 0.1 from step 5 (the checkpoint of step 4 trained with 0; "
          "long_run_steps=8)") in out
  assert json.loads((built / "config.json").read_text())["model"][
      "dropout_rate"] == 0.1
  # A long run resumed under a budget keeps its dropout: nothing to choose.
  rc, out, err = _finish(_start(timed, max_minutes=60, num_train_steps=14,
                                **common))
  assert rc == 0, err[-3000:]
  assert "Dropout 0.1: the checkpoint of step 12 trained with" in out
  assert "so dropout" not in out
  assert sorted(_train_losses(timed)) == list(range(1, 15))
  # Dropout changed the steps after 4: a run without it parts from them.
  plain = tmp_path / "plain"
  rc, _, err = _finish(_start(plain, num_train_steps=5,
                              **dict(common, long_run_steps=0)))
  assert rc == 0, err[-3000:]
  without, resumed = _train_losses(plain), _train_losses(built)
  assert all(without[s] == resumed[s] for s in range(1, 5))
  assert without[5] != resumed[5]


@pytest.mark.slow  # python -m train child processes that compile
def test_budget_fixes_the_step_count_of_a_decaying_schedule(tmp_path):
  # A linear schedule with a 60-minute budget: the plan times 3 steps and a
  # validation pass of a new model, then fixes the step count: here
  # num_train_steps (12) caps it. Every step must equal a run launched with
  # 12 steps.
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
  assert "timing 3 steps" in out_a
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


@pytest.mark.slow  # python -m train child processes that compile
def test_plan_command_prints_the_run_flags(tmp_path):
  # python -m train.plan: the planned run's flags on its last line; the
  # step count a short budget holds on the tiny model, capped by
  # num_train_steps; a budget of 0 minutes is a usage mistake.
  import sys
  base = [sys.executable, "-m", "train.plan", f"--config={TINY}",
          f"--workdir={tmp_path / 'run'}", "--config.synthetic_data=True",
          "--config.budget_timing_steps=3", "--config.num_train_steps=50",
          "--config.long_run_steps=40", "--config.model.dropout_rate=0.0"]
  done = subprocess.run(base + ["--minutes=5"], cwd=ROOT, env=ENV,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  last = done.stdout.strip().splitlines()[-1]
  assert last == ("--config.num_train_steps=50 "
                  "--config.model.dropout_rate=0.1"), done.stdout
  assert "num_train_steps caps the run at 50" in done.stdout
  bad = subprocess.run(base + ["--minutes=0"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2 and bad.stderr.startswith("error: --minutes=0")
  assert "Traceback" not in bad.stderr


@pytest.mark.slow  # python -m train child processes that compile
def test_a_budget_that_cannot_be_planned_is_refused_before_any_work(tmp_path):
  # Exit 2, one line, nothing written: a decaying schedule whose length and
  # dropout a budget would both have to fix.
  import sys
  workdir = tmp_path / "run"
  done = subprocess.run(
      [sys.executable, "-m", "train", f"--config={TINY}",
       f"--workdir={workdir}", "--config.synthetic_data=True",
       "--config.max_minutes=5", "--config.optimizer.schedule=linear",
       "--config.long_run_steps=100", "--config.model.dropout_rate=0.0"],
      cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
  assert done.returncode == 2, done.stderr[-3000:]
  assert done.stderr.startswith("error: config.long_run_steps=100 with a "
                                "linear schedule and --config.max_minutes")
  assert len(done.stderr.strip().splitlines()) <= 2
  assert not workdir.exists()


def test_a_rewound_train_iterator_gives_a_new_ones_batches(tmp_path):
  # The plan hands its input pipeline, rewound, to the trainer: the run
  # must see the batches a new iterator gives (the real pipeline here).
  import numpy as np
  from ml_collections import ConfigDict
  from experiments import configs
  from test_trainer import _write_corpus
  from train import input_pipeline, trainer
  paths = _write_corpus(str(tmp_path))
  config = configs.base_config()
  config.data = ConfigDict(dict(configs.data_config()))
  config.data.update({"name": "parallel_text", "vocab_size": 96,
                      "train_tsv_file": paths["train"],
                      "eval_tsv_file": paths["eval"], "max_len": 32})
  config.batch_size = 8
  tok = input_pipeline.train_or_load_tokenizer(config.data, str(tmp_path))
  used, _ = trainer.make_data(config, tok, tok.vocab_size)
  start = used.get_state()
  first = [next(used) for _ in range(3)]
  used.set_state(start)
  trainer.hand_over_data(config, tok, tok.vocab_size, (used, "eval"))
  handed, evaluation = trainer.make_data(config, tok, tok.vocab_size)
  assert handed is used and evaluation == "eval"
  fresh, _ = trainer.make_data(config, tok, tok.vocab_size)   # used once
  assert fresh is not used
  for a, b, c in zip(first, [next(handed) for _ in range(3)],
                     [next(fresh) for _ in range(3)]):
    assert a.keys() == b.keys() == c.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
      np.testing.assert_array_equal(a[k], c[k])
