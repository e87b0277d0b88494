"""The training loop's periodic actions, one object each.

``Log`` (every ``log_every_steps``: metrics fetched, checked for NaN,
written, the console line), ``Evaluation`` (every ``eval_every_steps``:
validation loss, and BLEU every ``eval_bleu_every_steps``) and
``Checkpoints`` (every ``checkpoint_every_steps``) each say when they are
``due(step, end)`` and do their work when called; ``end`` is why the step is
the loop's last (train/stop.py), or "". The loss is checked (``Log``) before
any evaluation or save, so nothing is evaluated or saved after a NaN.
"""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import logging

from train import evaluate, input_pipeline
from train import steps as steps_lib
from train.batches import trim_padding
from train.checkpointing import NonFiniteLossError
from train.metrics import progress_line
from train.stop import BUDGET, DONE, SIGNAL
from train.translation import DecodeOptions


# ---------------------------------------------------------------- evaluation

def evaluated_params(state):
  """What validation scores (and the best checkpoint is chosen by): the
  params' moving average where the run keeps one (optimizer.ema_decay),
  else the params."""
  return state.params if state.ema_params is None else state.ema_params


def evaluate_loss(runner, params, eval_data, num_batches: int) -> dict[str, float]:
  """Validation loss / NLL / perplexity / accuracy over the split (or a prefix)."""
  totals = None
  for i, batch in enumerate(eval_data.batches()):
    if 0 <= num_batches <= i:
      break
    if jax.process_count() == 1:  # hosts would disagree on the width
      batch = trim_padding(batch)
    sums = jax.device_get(runner.eval_step(params, runner.place_batch(batch)))
    totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
  if totals is None:
    return {}
  return {f"eval_{k}": float(v) for k, v in
          steps_lib.normalise(jax.tree.map(np.asarray, totals)).items()}


def evaluate_bleu(model_config, params, batches, references, tok,
                  options: DecodeOptions) -> dict[str, float]:
  """Periodic validation BLEU; a decoding failure is logged, never fatal."""
  try:
    scores = evaluate.validation_bleu(model_config, params, batches,
                                      references, tok, options)
  except Exception:  # pylint: disable=broad-except
    # A decoding bug must not end a long run; it is logged loudly instead.
    logging.exception("Validation BLEU failed; training continues.")
    return {}
  return {f"eval_{k}": float(v) for k, v in scores.items()}


def bleu_batches(config, tok, eval_data) -> list[dict[str, np.ndarray]]:
  """The validation batches decoded for periodic BLEU (``eval_bleu_num_batches``).

  Multi-host: every host decodes the same rows (all of them): the jitted
  search over the global params takes host-local inputs as replicated, so
  they must agree across hosts, and the score then covers every row.
  """
  if config.eval_bleu_every_steps <= 0 or tok is None:
    return []
  if jax.process_count() > 1:
    eval_data = input_pipeline.make_eval_data(
        config.data, tok, config.batch_size, process_index=0, process_count=1)
  batches = []
  for i, batch in enumerate(eval_data.batches()):
    if 0 <= config.eval_bleu_num_batches <= i:
      break
    batches.append(batch)
  return batches


def bleu_options(config) -> DecodeOptions:
  beam_size = config.eval_bleu_beam_size
  return DecodeOptions(method="beam" if beam_size > 1 else "greedy",
                       beam_size=beam_size, alpha=config.eval_bleu_alpha,
                       max_extra_len=config.eval_bleu_max_extra_len)


# ---------------------------------------------------------------- logging

class StepMetrics:
  """Device metrics of the steps since the last log: fetched, checked, averaged."""

  def __init__(self):
    self.pending: list[tuple[int, dict]] = []
    self.since = time.time()

  def add(self, step: int, metrics: dict) -> None:
    self.pending.append((step, metrics))
    if len(self.pending) >= 2:
      # At most two steps in flight: JAX would otherwise dispatch up to a
      # whole log interval ahead, and a SIGTERM (preemption) would wait for
      # all of them before the save.
      jax.block_until_ready(self.pending[-2][1])

  def flush(self, last_good: str) -> dict[str, float]:
    """Averages since the last flush; NonFiniteLossError on a NaN / Inf."""
    if not self.pending:
      return {}
    fetched = jax.device_get([m for _, m in self.pending])
    for (step, _), m in zip(self.pending, fetched):
      # The loss is computed before the update: a finite loss with a
      # non-finite gradient still leaves NaN params, so check both.
      if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):
        raise NonFiniteLossError(
            f"the training loss is {float(m['loss'])} at step {step} (grad "
            f"norm {float(m['grad_norm'])}). Last good checkpoint: {last_good}."
            " Lower optimizer.learning_rate_scale, set "
            "optimizer.grad_clip_norm, or check the data, then resume from it "
            "(rerun with the same workdir) or start a new workdir.")
    elapsed = max(time.time() - self.since, 1e-9)
    out = {f"train_{k}": float(np.mean([m[k] for m in fetched]))
           for k in ("loss", "nll", "accuracy", "grad_norm")}
    out["train_perplexity"] = float(np.exp(min(out["train_nll"], 50.0)))
    out["learning_rate"] = float(fetched[-1]["learning_rate"])
    out["steps_per_sec"] = len(fetched) / elapsed
    out["target_tokens_per_sec"] = sum(float(m["num_tokens"])
                                       for m in fetched) / elapsed
    self.pending, self.since = [], time.time()
    return out


class Log:
  """Train metrics: averaged since the last log, written, one console line."""

  def __init__(self, every: int, total: int, writer, say, stop):
    self.every, self.total = every, total
    self.writer, self.say, self.stop = writer, say, stop
    self.metrics = StepMetrics()

  def add(self, step: int, step_metrics) -> None:
    self.metrics.add(step, step_metrics)

  def due(self, step: int) -> bool:
    return step == 1 or step % self.every == 0

  def __call__(self, step: int, checkpoints: Checkpoints) -> dict[str, float]:
    """The scalars since the last log; NonFiniteLossError on a NaN / Inf
    (naming the last checkpoint), CheckpointWriteError on a failed save."""
    scalars = self.metrics.flush(checkpoints.last_good_text())
    self.writer.write(step, scalars)
    rate = scalars.get("steps_per_sec", 0.0)
    eta = min((self.total - step) / rate if rate > 0 else float("inf"),
              self.stop.seconds_left() - self.stop.reserve)
    self.say(progress_line(step, self.total, scalars, max(0.0, eta)))
    checkpoints.check()
    return scalars


# ---------------------------------------------------------------- evaluation

class Evaluation:
  """Validation loss every ``eval_every_steps`` and at the end (not on a
  signal: save first and fast), with BLEU every ``eval_bleu_every_steps``.

  Each pass's time is kept back from the wall-time stop (``stop.reserve``)
  so that the final one fits. At a stop for the wall time, BLEU only if a
  BLEU pass has been timed (an untimed one's searches compile).
  """

  def __init__(self, config, runner, model_config, tok, eval_data, writer,
               say, stop):
    self.every, self.bleu_every = (config.eval_every_steps,
                                   config.eval_bleu_every_steps)
    self.num_batches = config.num_eval_batches
    self.runner, self.model_config, self.tok = runner, model_config, tok
    self.eval_data, self.writer, self.say, self.stop = (eval_data, writer,
                                                         say, stop)
    self.bleu = bleu_batches(config, tok, eval_data)
    self.options = bleu_options(config)
    self.bleu_seconds, self.bleu_timed = 0.0, False   # the last BLEU pass's
    self.last: dict[str, float] = {}

  def due(self, step: int, end: str) -> bool:
    # On a signal (preemption) the save comes first and fast: no evaluation.
    return end != SIGNAL and (step % self.every == 0 or end in (DONE, BUDGET))

  def bleu_due(self, step: int, end: str) -> bool:
    return bool(self.bleu) and (step % self.bleu_every == 0 or end == DONE or
                                (end == BUDGET and self.bleu_timed))

  def __call__(self, step: int, state, end: str) -> dict[str, float]:
    start = time.time()
    params = evaluated_params(state)
    self.last = evaluate_loss(self.runner, params, self.eval_data,
                              self.num_batches)
    loss_seconds = time.time() - start
    if self.bleu_due(step, end):
      start = time.time()
      self.last.update(evaluate_bleu(
          self.model_config, self.runner.host_params(params), self.bleu,
          self.eval_data.references, self.tok, self.options))
      self.bleu_seconds, self.bleu_timed = time.time() - start, True
    self.stop.reserve = loss_seconds + self.bleu_seconds
    self.writer.write(step, self.last)
    self.say(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in
                                          sorted(self.last.items())))
    return self.last


# ---------------------------------------------------------------- checkpoints

class Checkpoints:
  """A checkpoint (train state, input-iterator state, config record) every
  ``checkpoint_every_steps`` and at the last step, whatever ends the run
  (a signal's included)."""

  def __init__(self, ckpt, every: int, runner, train_iter, record):
    self.ckpt, self.every = ckpt, every
    self.runner, self.train_iter, self.record = runner, train_iter, record
    self.last_good = ckpt.latest_step()

  def due(self, step: int, end: str) -> bool:
    return step % self.every == 0 or bool(end)

  def last_good_text(self) -> str:
    """Where the run would resume from, for an error message."""
    if self.last_good is None:
      return "none"
    return f"step {self.last_good} in {self.ckpt.directory}"

  def check(self) -> None:
    """CheckpointWriteError if a background save failed."""
    self.ckpt.check_for_errors()

  def __call__(self, step: int, state, metrics: dict | None) -> None:
    self.ckpt.save(step, self.runner.state_for_checkpoint(state),
                   self.train_iter, self.record, metrics=metrics, force=True)
    self.last_good = step
