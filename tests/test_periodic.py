"""The training loop's periodic actions (train/periodic.py) and its stop
(train/stop.py), each on fakes: when it is due, what it does."""

from __future__ import annotations

import time

import numpy as np
import pytest

from train import periodic, stop as stop_lib
from train.checkpointing import NonFiniteLossError
from train.stop import BUDGET, DONE, SIGNAL, StopRequest


class Writer:
  def __init__(self):
    self.written = []

  def write(self, step, scalars):
    self.written.append((step, dict(scalars)))


def step_metrics(loss, tokens=10.0):
  return {"loss": np.float32(loss), "nll": np.float32(loss - 0.1),
          "accuracy": np.float32(0.5), "grad_norm": np.float32(1.0),
          "learning_rate": np.float32(1e-3), "num_tokens": np.float32(tokens)}


class Ckpt:
  directory = "/runs/x/checkpoints"

  def __init__(self, latest=None):
    self.saved, self.latest, self.checked = [], latest, 0

  def latest_step(self):
    return self.latest

  def check_for_errors(self):
    self.checked += 1

  def save(self, step, state, data_iterator, record, metrics=None, force=False):
    self.saved.append((step, state, metrics, force))


class Runner:
  """Identity placement; an eval step whose sums are the batch's."""

  def place_batch(self, batch):
    return batch

  def eval_step(self, params, batch):
    del params
    return {k: np.float32(v[0]) for k, v in batch.items()
            if k not in ("src", "tgt")}

  def state_for_checkpoint(self, state):
    return ("saved", state)

  def host_params(self, params):
    return params


class EvalData:
  references = ["a b", "c d"]

  def __init__(self, sums):
    self.sums = sums

  def batches(self):
    return iter(self.sums)


def test_the_budget_keeps_back_the_final_evaluation():
  # 60 s budget, 50 s used: 10 s left.
  stop = StopRequest(1.0, time.time() - 50.0)
  assert not stop.requested(at_log_step=True)
  stop.reserve = 8.0    # a validation pass of 8 s still fits
  assert not stop.requested(at_log_step=True)
  stop.reserve = 12.0   # one of 12 s does not: stop now
  assert stop.requested(at_log_step=True)
  assert not StopRequest(0.0, time.time() - 1e6).requested(True)


def test_stop_says_why_a_step_is_the_last():
  stop = StopRequest(1.0, time.time() - 50.0)
  assert stop.end(5, 10, True) == ""
  assert stop.end(10, 10, True) == DONE
  stop.reserve = 12.0
  assert stop.end(5, 10, True) == BUDGET
  assert stop.message(5, BUDGET) == ("Stopping at step 5: wall-time budget "
                                     "of 1 min used")
  stop.signalled = "signal SIGTERM"
  assert stop.end(5, 10, False) == SIGNAL
  assert stop.message(5, SIGNAL) == ("Stopping at step 5 on signal SIGTERM; "
                                     "checkpoint saved")
  assert stop.message(10, DONE) == ""


def test_stop_catches_sigterm_while_the_loop_runs():
  import os
  import signal
  before = signal.getsignal(signal.SIGTERM)
  with StopRequest(0.0, time.time()) as stop:
    os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.time() + 5
    while not stop.signalled and time.time() < deadline:
      time.sleep(0.01)
    assert stop.end(3, 10, at_log_step=False) == SIGNAL
  assert signal.getsignal(signal.SIGTERM) is before


def test_log_averages_writes_and_checks_the_loss():
  writer, said = Writer(), []
  stop = StopRequest(0.0, time.time())
  log = periodic.Log(10, 100, writer, said.append, stop)
  assert log.due(1) and log.due(20) and not log.due(11)
  ckpt = Ckpt(latest=None)
  checkpoints = periodic.Checkpoints(ckpt, 50, Runner(), None, {})
  log.add(1, step_metrics(2.0))
  log.add(2, step_metrics(4.0))
  scalars = log(2, checkpoints)
  assert scalars["train_loss"] == pytest.approx(3.0)
  assert scalars["train_perplexity"] == pytest.approx(np.exp(2.9), rel=1e-5)
  assert writer.written == [(2, scalars)]
  assert said[-1].startswith("step   2/100 | loss 3.000")
  assert ckpt.checked == 1
  assert log(3, checkpoints) == {}   # nothing since the last flush
  checkpoints.last_good = 40
  log.add(41, step_metrics(float("nan")))
  with pytest.raises(NonFiniteLossError, match=r"nan at step 41 .*Last good "
                     r"checkpoint: step 40 in /runs/x/checkpoints\."):
    log(41, checkpoints)


def test_evaluation_is_due_every_n_steps_and_at_an_end_but_a_signal():
  config = pytest.importorskip("experiments.configs").base_config()
  config.eval_every_steps, config.num_eval_batches = 10, -1
  writer, said = Writer(), []
  stop = StopRequest(0.0, time.time())
  # Two batches of loss sums: 6 / 4 tokens and 2 / 4 -> loss 8 / 8 = 1.
  # (Each batch: one row of ids, and the sums the fake eval step returns.)
  ids = {"src": np.ones((1, 4), np.int32), "tgt": np.ones((1, 4), np.int32)}
  sums = [dict(ids, loss_sum=[6.0], nll_sum=[4.0], correct=[2.0],
               num_tokens=[4.0]),
          dict(ids, loss_sum=[2.0], nll_sum=[2.0], correct=[4.0],
               num_tokens=[4.0])]
  sums = [{k: np.asarray(v) for k, v in b.items()} for b in sums]
  evaluation = periodic.Evaluation(config, Runner(), None, None,
                                   EvalData(sums), writer, said.append, stop)
  assert evaluation.due(10, "") and evaluation.due(20, "")
  assert not evaluation.due(11, "") and not evaluation.due(11, SIGNAL)
  assert evaluation.due(11, DONE) and evaluation.due(11, BUDGET)
  # On a signal the save comes first, even at an evaluation step.
  assert not evaluation.due(20, SIGNAL)

  class State:
    params, ema_params = "params", None
  scores = evaluation(10, State(), "")
  assert scores["eval_loss"] == pytest.approx(1.0)
  assert scores["eval_nll"] == pytest.approx(0.75)
  assert scores["eval_accuracy"] == pytest.approx(0.75)
  assert writer.written == [(10, scores)] and evaluation.last == scores
  assert said[-1].startswith("step 10: eval_accuracy 0.7500")
  assert 0.0 <= stop.reserve < 5.0   # the pass's time, kept back


def test_bleu_at_its_steps_at_the_end_and_at_a_budget_stop_once_timed():
  config = pytest.importorskip("experiments.configs").base_config()
  config.eval_every_steps, config.eval_bleu_every_steps = 10, 30
  evaluation = periodic.Evaluation(config, Runner(), None, None,
                                   EvalData([]), Writer(), lambda m: None,
                                   StopRequest(0.0, time.time()))
  assert evaluation.bleu == []           # no tokenizer: no BLEU
  assert not evaluation.bleu_due(30, DONE)
  evaluation.bleu = [{"src": np.zeros((1, 2), np.int32)}]
  assert evaluation.bleu_due(30, "") and not evaluation.bleu_due(20, "")
  assert evaluation.bleu_due(21, DONE)
  assert not evaluation.bleu_due(21, BUDGET)   # an untimed pass may not fit
  evaluation.bleu_timed = True
  assert evaluation.bleu_due(21, BUDGET)


def test_checkpoints_every_n_steps_and_at_any_end():
  ckpt = Ckpt(latest=20)
  checkpoints = periodic.Checkpoints(ckpt, 50, Runner(), "iterator", {"r": 1})
  assert checkpoints.last_good_text() == "step 20 in /runs/x/checkpoints"
  assert checkpoints.due(50, "") and not checkpoints.due(51, "")
  assert all(checkpoints.due(51, end) for end in (DONE, SIGNAL, BUDGET))
  checkpoints(51, "state", {"eval_loss": 1.0})
  assert ckpt.saved == [(51, ("saved", "state"), {"eval_loss": 1.0}, True)]
  assert checkpoints.last_good == 51
  assert periodic.Checkpoints(Ckpt(), 5, None, None, {}).last_good_text() == "none"


def test_stop_module_names_its_ends():
  assert {stop_lib.DONE, stop_lib.SIGNAL, stop_lib.BUDGET} == {
      "done", "signal", "budget"}
