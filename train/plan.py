"""A wall-time budget planned before training: the step count it holds.

    python -m train.plan --config=experiments/configs/<name>.py \
        --workdir=<dir> --minutes=30

times a new model's first steps (after the one that compiles), a
validation pass and, where the config runs BLEU, a BLEU pass, and prints
the flags of the run the budget holds: ``--config.num_train_steps=N``, the
dropout that length gets (``long_run_steps`` / ``long_run_dropout_rate``)
and, for a decaying schedule, where it ends. The timed model is thrown
away. ``python -m train --config.max_minutes=N`` calls ``planned_config``
first, in the same launch (its own time counts against the budget; its
input pipeline, rewound, and its compiled runner go on to the trainer), so
the trainer always trains to a step count, and a run is reproduced from
its record by that count (``--config.max_minutes=0``); max_minutes stays in
the record as a safety stop.

Resumed runs: the budget holds steps after the checkpoint's; a decaying
schedule's length, once fixed by a run's first launch, is kept; a run that
trained with long_run_dropout_rate keeps it.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import jax
import ml_collections
import numpy as np

import tokenizer
from model import ConfigError
from train import checkpointing, periodic, run_length, trainer

# Share of a budget that planning keeps back for what it does not time:
# checkpoint writes, a machine that slows down during the run.
BUDGET_MARGIN = 0.03


def steps_in_budget(seconds: float, step_seconds: float, eval_seconds: float,
                    eval_every: int, compile_seconds: float,
                    margin: float = BUDGET_MARGIN, *, bleu_seconds: float = 0.0,
                    bleu_every: int = 0, final_seconds: float = 0.0) -> int:
  """How many more train steps fit in ``seconds`` of wall time.

  Each step costs step_seconds, every eval_every-th one a validation pass
  more (eval_seconds), every bleu_every-th a BLEU pass (bleu_seconds); the
  run's start costs compile_seconds and its end final_seconds (the last
  evaluation); ``margin`` of the time is kept back.
  """
  usable = seconds * (1.0 - margin) - compile_seconds - final_seconds
  per_step = step_seconds + (eval_seconds / eval_every if eval_every > 0
                             else 0.0)
  if bleu_every > 0:
    per_step += bleu_seconds / bleu_every
  return max(0, int(usable // per_step))


@dataclasses.dataclass
class Timing:
  """Seconds measured on a new model (thrown away)."""
  data: float     # the input pipeline (handed on to the trainer)
  init: float     # the model's initial state (made again by the trainer)
  compile: float  # the first train step
  step: float     # a train step, after the first
  eval: float     # a validation pass (its first: compiling included)
  bleu: float     # a BLEU pass (0 without BLEU)


def time_run(config, tok, vocab_size: int) -> Timing:
  """Times budget_timing_steps train steps after the compiling one, a
  validation pass and a BLEU pass, on a new model. The input pipeline,
  rewound, and the runner go on to the trainer (``trainer.make_data``,
  ``trainer.make_runner``): neither is prepared or compiled twice."""
  times = [time.time()]
  model_config = trainer.model_config_for(config, vocab_size)
  runner = trainer.make_runner(config, model_config)
  train_iter, eval_data = trainer.make_data(config, tok, vocab_size)
  start = train_iter.get_state()
  times.append(time.time())
  init_rng, rng = jax.random.split(jax.random.key(config.seed))
  state = jax.block_until_ready(runner.init_state(init_rng))
  times.append(time.time())
  for i in range(1 + config.budget_timing_steps):
    state, metrics = runner.train_step(
        state, runner.place_batch(next(train_iter)), rng)
    if i in (0, config.budget_timing_steps):
      jax.block_until_ready(metrics)
      times.append(time.time())
  params = periodic.evaluated_params(state)
  periodic.evaluate_loss(runner, params, eval_data, config.num_eval_batches)
  times.append(time.time())
  bleu = periodic.bleu_batches(config, tok, eval_data)
  if bleu:
    periodic.evaluate_bleu(model_config, runner.host_params(params), bleu,
                           eval_data.references, tok,
                           periodic.bleu_options(config))
  times.append(time.time())
  train_iter.set_state(start)   # the trainer's from its first batch
  trainer.hand_over_data(config, tok, vocab_size, (train_iter, eval_data))
  data, init, compiling, steps, evaluation, bleu_pass = np.diff(times)
  return Timing(data, init, compiling, steps / config.budget_timing_steps,
                evaluation, bleu_pass)


def resumed_from(config, workdir, record: dict, checkpoint_step: int | None,
                 tok=None) -> tuple[int, dict | None]:
  """(the step a launch resumes from, that checkpoint's config record);
  (0, None) for a new run. The newest record that reads, as the trainer
  falls back past a damaged checkpoint. Refused here, before the minutes
  of timing: a checkpoint of an incompatible config (``record``: this
  run's) or of a tokenizer other than ``tok``, a --checkpoint step that is
  not there."""
  ckpt = checkpointing.Checkpointer(workdir, config.checkpoint,
                                    bleu=config.eval_bleu_every_steps > 0,
                                    tokenizer=tok)
  try:
    steps = ckpt.all_steps()
    if not steps and checkpoint_step is None:
      return 0, None

    def read(step):   # the trainer's rule: a step without its files is damaged
      checkpointing.check_complete(ckpt.directory, step)
      # The trainer, which resumes, warns of the harmless config changes.
      return checkpointing.check_compatible(ckpt, step, record, warn=False)
    step, saved, _ = checkpointing.restore_newest(
        ckpt.directory, steps, checkpoint_step, read)
    return step, saved
  finally:
    ckpt.close()


def check_budget(config) -> None:
  """ConfigError for a budget that cannot be planned, before any work."""
  run_length.check_long_run(config)
  if run_length.plans_steps_from_time(config):
    run_length.check_budget_timing(config)
    run_length.check_schedule(run_length.with_provisional_length(config))
  elif config.budget_timing_steps < 1:
    raise ConfigError(
        f"config.budget_timing_steps={config.budget_timing_steps}: with "
        "--config.max_minutes the run times at least 1 step to plan its "
        "length; or set --config.max_minutes=0 and num_train_steps")


def kept_length(config, workdir, step: int, saved: dict, say) -> int:
  """The decaying schedule's length its first launch fixed (0: none yet)."""
  fixed = saved["experiment"].get("optimizer", {}).get("decay_steps", 0)
  if fixed > 0:
    say(f"This run's length was fixed at {fixed} steps by the budget of its "
        f"first launch (its {config.optimizer.schedule} schedule ends "
        "there)" + (": it has trained them all. To train longer, start "
                    "a new --workdir with a larger --config.max_minutes"
                    if step >= fixed else ""))
  elif step + 1 + config.budget_timing_steps > config.optimizer.warmup_steps:
    raise ConfigError(
        f"the checkpoint of step {step} in {checkpointing.checkpoint_dir(workdir)}"
        " records no step count, and steps timed from there would end past "
        f"optimizer.warmup_steps={config.optimizer.warmup_steps}: set "
        "--config.optimizer.decay_steps (the step the schedule ends at)")
  return fixed


def planned_config(config, workdir, checkpoint_step: int | None = None,
                   start_time: float | None = None, say=None
                   ) -> ml_collections.ConfigDict:
  """A copy of ``config`` with the step count its budget (max_minutes,
  counted from start_time; None: now) holds, and that length's dropout and
  schedule end; ``config`` itself without a budget. num_train_steps caps
  the count."""
  if config.max_minutes <= 0:
    return config
  start_time = time.time() if start_time is None else start_time
  check_budget(config)
  config = ml_collections.ConfigDict(config.to_dict())
  workdir, main_say, lock = trainer.open_workdir(config, workdir)
  with lock.released_on_error():   # the training it plans takes it on
    return _plan(config, workdir, say or main_say, checkpoint_step,
                 start_time)


def _plan(config, workdir, say, checkpoint_step: int | None,
          start_time: float) -> ml_collections.ConfigDict:
  """planned_config's work, once the workdir is claimed."""
  # Before a tokenizer trains: --checkpoint names a step that is there.
  checkpointing.require_step(checkpointing.checkpoint_dir(workdir), None,
                             checkpoint_step)
  say(f"Planning --config.max_minutes={config.max_minutes:g} in {workdir}: "
      f"the tokenizer and data, then timing {config.budget_timing_steps} "
      "steps after the compiling one, a validation pass and (where the run "
      "has BLEU) a BLEU pass of a new model (the first step compiles; it can "
      "take a while)")
  tok, vocab_size = trainer.load_tokenizer(config, workdir)
  record = checkpointing.config_record(
      config, trainer.model_config_for(config, vocab_size))
  step, saved = resumed_from(config, workdir, record, checkpoint_step, tok)
  fixes_schedule = run_length.plans_steps_from_time(config)
  if fixes_schedule and saved:
    fixed = kept_length(config, workdir, step, saved, say)
    if fixed:
      config.num_train_steps = config.optimizer.decay_steps = fixed
      return config
  chooses_dropout = run_length.decides_dropout_from_time(config)
  saved_rate = saved["model"].get("dropout_rate") if saved else None
  if chooses_dropout and saved_rate == config.long_run_dropout_rate:
    # A long run stays one: a launch under a budget keeps its dropout.
    chooses_dropout, config.model.dropout_rate = False, saved_rate
    say(f"Dropout {saved_rate:g}: the checkpoint of step {step} trained "
        "with long_run_dropout_rate")
  rate = run_length.configured_dropout(config)
  timed = time_run(run_length.with_provisional_length(config)
                   if fixes_schedule else config, tok, vocab_size)
  seconds = config.max_minutes * 60 - (time.time() - start_time)
  def holds(recompiles: bool) -> int:
    # The trainer's runner is the timed one (its programs compiled) unless
    # its program differs (the schedule's end or the dropout fixed now):
    # then its model's init and its train step compile again.
    return step + steps_in_budget(
        seconds, timed.step, timed.eval, config.eval_every_steps,
        timed.init + timed.compile if recompiles else 0.0,
        bleu_seconds=timed.bleu, bleu_every=config.eval_bleu_every_steps,
        final_seconds=timed.eval + timed.bleu)
  fit = holds(fixes_schedule)
  if chooses_dropout and run_length.dropout_for_length(
      config, min(fit, config.num_train_steps)) != rate:
    fit = holds(True)
  if jax.process_count() > 1:  # every host trains the same steps
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    fit = int(multihost_utils.broadcast_one_to_all(np.int32(fit)))
  total = min(fit, config.num_train_steps)
  if fixes_schedule and total <= config.optimizer.warmup_steps:
    raise ConfigError(
        f"--config.max_minutes={config.max_minutes:g} holds {fit} steps at "
        f"{timed.step:.2f} s a step, no more than optimizer.warmup_steps="
        f"{config.optimizer.warmup_steps}: raise max_minutes or lower "
        "warmup_steps")
  say(timed_line(config, timed, step, fit, total, chooses_dropout))
  config.num_train_steps = total
  if fixes_schedule:
    config.optimizer.decay_steps = total
  if chooses_dropout:
    config.model.dropout_rate = run_length.dropout_for_length(config, total)
  return config


def timed_line(config, timed: Timing, step: int, fit: int, total: int,
               chooses_dropout: bool) -> str:
  """The console line that says what the budget holds and what follows."""
  line = (f"Timed: {timed.data:.1f} s to prepare the data, {timed.init:.1f}"
          f" s the model, {timed.compile:.1f} s to compile, {timed.step:.2f} s"
          f" a step, {timed.eval:.1f} s a validation pass" +
          (f", {timed.bleu:.1f} s a BLEU pass" if timed.bleu else "") +
          ": the budget holds ")
  if chooses_dropout:
    rate, now = (run_length.dropout_for_length(config, total),
                 run_length.configured_dropout(config))
    line += (f"~{fit} steps at dropout {now:g}, so dropout {rate:g}" + (
        f" from step {step + 1} (a run of long_run_steps="
        f"{config.long_run_steps} or more)" if rate != now else ""))
  else:
    line += f"{fit} steps"
  if total != fit:
    line += f", num_train_steps caps the run at {total}"
  if run_length.plans_steps_from_time(config):
    line += f"; the {config.optimizer.schedule} schedule ends at step {total}"
  return line + (f" (the same run: --config.num_train_steps={total} "
                 "--config.max_minutes=0)")


def run_flags(config) -> str:
  """The flags of the planned run (``python -m train.plan``'s output)."""
  flags = [f"--config.num_train_steps={config.num_train_steps}",
           f"--config.model.dropout_rate={run_length.dropout_for_length(config, config.num_train_steps):g}"]
  if config.optimizer.schedule != "rsqrt":
    flags.append(f"--config.optimizer.decay_steps={config.optimizer.decay_steps}")
  return " ".join(flags)


def main(argv) -> None:
  """python -m train.plan: the planned run's flags on the last line."""
  del argv
  from absl import flags, logging  # pylint: disable=g-import-not-at-top
  from train import __main__ as entry, cli  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)   # as python -m train
  checkpointing.quiet_abandoned_checkpoint_io()
  minutes = flags.FLAGS.minutes
  if minutes <= 0:
    entry._usage_error(f"--minutes={minutes:g}: give the budget in minutes, "  # pylint: disable=protected-access
                       "more than 0")
  cli.use_compilation_cache()  # the run that follows reads the programs back
  config = ml_collections.ConfigDict(entry._CONFIG.value.to_dict())  # pylint: disable=protected-access
  config.max_minutes = minutes
  step = entry.checkpoint_flag()
  try:
    # The budget is the training launch's: this command's time is not in it.
    planned = planned_config(config, entry._WORKDIR.value, step)  # pylint: disable=protected-access
  except (ConfigError, checkpointing.IncompatibleCheckpointError,
          checkpointing.CheckpointNotFoundError,
          tokenizer.TokenizerFileError) as e:
    entry._usage_error(str(e))  # pylint: disable=protected-access
  print(run_flags(planned), flush=True)
  sys.exit(0)


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from train import __main__ as _entry  # pylint: disable=g-import-not-at-top
  flags.DEFINE_float("minutes", 0.0, "The training budget, in minutes.")
  app.run(main, flags_parser=_entry.parse_flags)
