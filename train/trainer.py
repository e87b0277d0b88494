"""The training loop: steps, periodic evaluation, checkpoints, metrics.

``train_and_evaluate(config, workdir)`` trains (or resumes) one experiment
to ``num_train_steps``. ``setup`` does everything before the first step:

1. tokenizer: trained on the training split, or loaded, at
   ``<workdir>/tokenizer/spm.model``; the model's vocab_size is set from it;
2. if ``<workdir>/checkpoints`` holds a checkpoint, the config is checked
   against it (an incompatible one is refused before anything in the
   workdir changes) and the run resumes from the newest checkpoint that
   restores (train state and input-iterator state: exactly the batches an
   uninterrupted run would see), or from ``checkpoint_step`` if given; newer
   steps are moved to ``<workdir>/checkpoints_set_aside/`` (never deleted);
3. the resolved config is written to ``<workdir>/config.json``.

The loop then runs its periodic actions (train/periodic.py): logging every
``log_every_steps`` (console line, TensorBoard, ``metrics.jsonl``), the
validation loss every ``eval_every_steps``, BLEU every
``eval_bleu_every_steps``, a checkpoint every ``checkpoint_every_steps`` and
at the end. It stops early on SIGTERM (checkpoint, then exit 0; multi-host:
agreed at log steps) or at ``max_minutes`` of wall time, a safety limit
that keeps back the time of the final evaluation (train/stop.py). A budget
(``python -m train --config.max_minutes=N``) is turned into a step count
before training (train/plan.py).

A NaN or Inf loss stops the run with ``NonFiniteLossError`` naming the step
and the last checkpoint written before it (losses are checked before every
checkpoint, so none is written after a non-finite loss).
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from etils import epath

import tokenizer as tokenizer_lib
from model import TransformerConfig
from train import checkpointing, input_pipeline, periodic, run_length, sharding
from train import workdir as workdir_lib
from train import steps as steps_lib
from train.batches import SyntheticBatches, SyntheticEval
from train.metrics import MetricWriter
from train.prefetch import DevicePrefetch
from train.stop import StopRequest

CONFIG_FILE = "config.json"


# ---------------------------------------------------------------- set-up

def model_config_for(config, vocab_size: int) -> TransformerConfig:
  """The preset + overrides, vocab from the tokenizer, max_len >= the data's."""
  overrides = {k: v for k, v in config.model.to_dict().items() if v is not None}
  overrides["vocab_size"] = int(vocab_size)
  base = TransformerConfig.preset(config.model_preset, **overrides)
  if base.max_len < config.data.max_len:
    base = base.replace(max_len=config.data.max_len)
  return base


def load_tokenizer(config, workdir) -> tuple[tokenizer_lib.Tokenizer | None, int]:
  """(the run's tokenizer, vocab size); (None, the model's) for synthetic data."""
  if config.synthetic_data:
    return None, (config.model.vocab_size or
                  TransformerConfig.preset(config.model_preset).vocab_size)
  tok = input_pipeline.train_or_load_tokenizer(config.data, str(workdir))
  return tok, tok.vocab_size


def make_data(config, tok, vocab_size: int):
  """(train iterator, validation data) of this process; the ones handed
  over by ``hand_over_data`` where made for the same data."""
  global _handed_over
  key = _data_key(config, tok, vocab_size)
  if _handed_over and _handed_over[0] == key:
    data, _handed_over = _handed_over[1], None
    return data
  if config.synthetic_data:
    where = dict(process_index=jax.process_index(),
                 process_count=jax.process_count())
    return (SyntheticBatches(config.batch_size, config.data.max_len,
                             vocab_size, seed=config.seed, **where),
            SyntheticEval(config.batch_size, config.data.max_len, vocab_size,
                          seed=10_000 + config.seed, **where))
  return (input_pipeline.make_train_iterator(config.data, tok,
                                             config.batch_size),
          input_pipeline.make_eval_data(config.data, tok, config.batch_size))


# Data prepared by the budget plan (train/plan.py) in the launch that then
# trains, its train iterator rewound to its start: preparing the pipeline
# again would cost the run seconds to minutes of its budget. Used once.
_handed_over: tuple[str, tuple[Any, Any]] | None = None


def _data_key(config, tok, vocab_size: int) -> str:
  return json.dumps([config.data.to_dict(), config.batch_size,
                     config.synthetic_data, config.seed, int(vocab_size),
                     tok.fingerprint if tok is not None else None],
                    sort_keys=True, default=str)


def hand_over_data(config, tok, vocab_size: int, data) -> None:
  """Keeps (train iterator at its start, validation data) for the next
  ``make_data`` of the same data in this process."""
  global _handed_over
  _handed_over = (_data_key(config, tok, vocab_size), data)


# The runner last made and what it was made for. The budget plan
# (train/plan.py) times its steps in the launch that then trains: a run of
# the same program reuses the plan's runner, whose steps are compiled
# (jax.jit keeps its executables per function object).
_last_runner: tuple[str, Any] | None = None


def make_runner(config, model_config: TransformerConfig, devices=None):
  """The steps of config.optimizer / label_smoothing, placed by
  config.parallelism, config.mesh and config.logical_axis_rules.

  A decaying schedule needs its decay_steps (``run_length.for_fixed_length``
  fills them in from num_train_steps).
  """
  global _last_runner
  key = json.dumps([config.optimizer.to_dict(), config.label_smoothing,
                    config.batch_size, config.parallelism,
                    config.mesh.to_dict(), config.logical_axis_rules,
                    model_config.to_dict()], sort_keys=True, default=str)
  if devices is None and _last_runner and _last_runner[0] == key:
    return _last_runner[1]
  parts = steps_lib.build(model_config, config.optimizer,
                          config.label_smoothing)
  runner = sharding.make_runner(
      parts, config.batch_size, parallelism=config.parallelism,
      mesh_config=config.mesh, rules=config.logical_axis_rules,
      devices=devices)
  if devices is None:
    _last_runner = (key, runner)
  return runner


def save_config(record: dict, workdir: epath.Path) -> None:
  """<workdir>/config.json, written atomically by the main process."""
  if sharding.is_main_process():
    tmp = workdir / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(record["experiment"], indent=2, sort_keys=True))
    tmp.replace(workdir / CONFIG_FILE)



def open_workdir(config, workdir
                 ) -> tuple[epath.Path, Callable[[str], None], workdir_lib.Lock]:
  """(the workdir, created and claimed for training; a print that only the
  main process does; the workdir's lock, held until released).

  Starts jax.distributed first where the config asks for it. The model's
  shape is checked before the workdir is touched (a tokenizer trains next).
  A second call in the same process gets the lock it already holds.
  """
  model_config_for(config, config.data.vocab_size)
  sharding.maybe_initialize_distributed(config.distributed)
  main = sharding.is_main_process()
  lock = workdir_lib.claim(workdir, not config.synthetic_data, main)
  workdir = epath.Path(workdir)
  if main:
    return workdir, lambda msg: print(msg, flush=True), lock
  return workdir, lambda msg: None, lock


@dataclasses.dataclass
class Run:
  """What ``setup`` hands the loop: one experiment, ready at ``step``."""
  config: ml_collections.ConfigDict   # resolved for its step count
  workdir: epath.Path
  say: Callable[[str], None]
  lock: workdir_lib.Lock  # released when training ends
  tok: tokenizer_lib.Tokenizer | None
  model_config: TransformerConfig
  record: dict            # the config record each checkpoint stores
  runner: Any             # sharding.Runner: train / eval steps, placement
  ckpt: checkpointing.Checkpointer
  train_iter: Any
  eval_data: Any
  state: Any              # the train state, restored or new
  step: int               # the state's step
  dropout_rng: jax.Array


def setup(config, workdir, checkpoint_step: int | None = None) -> Run:
  """Everything before the first step: the config checked and resolved for
  its step count, the workdir, tokenizer, data, model and train state
  (restored or new), the resolved config written to config.json."""
  config = run_length.for_fixed_length(config)  # refused before any work
  workdir, say, lock = open_workdir(config, workdir)
  with lock.released_on_error():
    checkpointing.require_step(checkpointing.checkpoint_dir(workdir), None,
                               checkpoint_step)   # before a tokenizer trains
    say(f"Preparing data and tokenizer in {workdir} ...")
    tok, vocab_size = load_tokenizer(config, workdir)
    model_config = model_config_for(config, vocab_size)
    record = checkpointing.config_record(config, model_config)
    runner = make_runner(config, model_config)
    ckpt = checkpointing.Checkpointer(
        workdir, config.checkpoint, bleu=config.eval_bleu_every_steps > 0,
        tokenizer=tok)
    train_iter, eval_data = make_data(config, tok, vocab_size)
    init_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))
    state = restore_or_init(ckpt, runner, train_iter, record, init_rng,
                            checkpoint_step, say)
    step = int(jax.device_get(runner.state_for_checkpoint(state).step))
    workdir_lib.check_steps_left(step, config.num_train_steps, ckpt.directory)
    say_dropout_change(config, ckpt, step, model_config.dropout_rate, say)
    save_config(record, workdir)  # only once the config is known to fit
    say(f"Model: {model_config}")
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(
        runner.abstract_state().params))
    say(f"{num_params:,} parameters; step {step}; devices: "
        f"{jax.device_count()} ({jax.process_count()} processes), parallelism="
        f"{config.parallelism}")
    if config.device_prefetch > 0:   # after the restore: from its batch on
      train_iter = DevicePrefetch(train_iter, runner.place_batch,
                                  config.device_prefetch)
    return Run(config, workdir, say, lock, tok, model_config, record, runner, ckpt,
               train_iter, eval_data, state, step, dropout_rng)


def placed_batches(train_iter, place: Callable):
  """The batches the loop steps on, each placed on the devices once: a
  DevicePrefetch's are placed ahead already, others as they are taken."""
  if isinstance(train_iter, DevicePrefetch):
    return train_iter
  return map(place, train_iter)


def say_dropout_change(config, ckpt, step: int, rate: float, say) -> None:
  """One line where a resumed run trains on at another dropout rate."""
  saved = ckpt.restore_config(step) if step > 0 else None
  saved_rate = saved["model"].get("dropout_rate") if saved else None
  if saved_rate is None or saved_rate == rate:
    return
  long_by_steps = 0 < config.long_run_steps <= config.num_train_steps
  say(f"Dropout {rate:g} from step {step + 1} (the checkpoint of step {step} "
      f"trained with {saved_rate:g}" + (
          f"; long_run_steps={config.long_run_steps}" if long_by_steps
          else "") + ")")


def restore_or_init(ckpt, runner, train_iter, record, rng, checkpoint_step,
                    say) -> Any:
  """The train state: the chosen (or newest restorable) checkpoint, or new.

  Each candidate step's config is checked against ``record`` first: an
  incompatible one raises IncompatibleCheckpointError, nothing is changed.
  """
  steps = ckpt.all_steps()
  if not steps and checkpoint_step is None:
    say("Initialising a new model")
    return runner.init_state(rng)

  def restore(step):
    checkpointing.check_compatible(ckpt, step, record)
    return ckpt.restore(step, runner.abstract_state(), train_iter)

  step, restored, skipped = checkpointing.restore_newest(
      ckpt.directory, steps, checkpoint_step, restore)
  # Training on writes steps after this one: move the newer ones (damaged, or
  # passed over by --checkpoint) where they cannot collide. Never deleted.
  for newer in [s for s in steps if s > step]:
    why = "does not restore" if newer in skipped else "is newer than --checkpoint"
    moved = checkpointing.set_aside(ckpt.directory, newer)
    say(f"Moved the checkpoint of step {newer}, which {why}, to {moved}")
  ckpt.reload()
  say(f"Resuming from step {step} ({ckpt.directory})")
  return runner.state_from_checkpoint(restored)


# ---------------------------------------------------------------- the loop

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       checkpoint_step: int | None = None,
                       start_time: float | None = None) -> dict[str, Any]:
  """Trains (or resumes) the experiment in ``workdir`` to num_train_steps;
  returns the last metrics.

  checkpoint_step: resume from this step instead of the newest checkpoint.
  start_time: when this launch began (its max_minutes count from there).
  """
  start_time = time.time() if start_time is None else start_time
  run = setup(config, workdir, checkpoint_step)
  config, runner, say = run.config, run.runner, run.say
  total, step, state = config.num_train_steps, run.step, run.state
  writer = MetricWriter(run.workdir, enabled=sharding.is_main_process(),
                        start_step=run.step)
  stop = StopRequest(config.max_minutes, start_time)
  last, end = {}, ""
  try:
    log = periodic.Log(config.log_every_steps, total, writer, say, stop)
    evaluation = periodic.Evaluation(config, runner, run.model_config, run.tok,
                                     run.eval_data, writer, say, stop)
    checkpoints = periodic.Checkpoints(run.ckpt, config.checkpoint_every_steps,
                                       runner, run.train_iter, run.record)
    say(f"Training to step {total}" + (f" or for {config.max_minutes:g} min"
                                        if config.max_minutes > 0 else "")
        + " (the first step compiles; it can take a while)")
    with stop:  # a signal during the final save (ckpt.close) changes nothing
      try:
        batches = placed_batches(run.train_iter, runner.place_batch)
        for step in range(run.step + 1, total + 1):
          state, step_metrics = runner.train_step(state, next(batches),
                                                  run.dropout_rng)
          log.add(step, step_metrics)
          end = stop.end(step, total, step % config.log_every_steps == 0)
          due = [a for a in (evaluation, checkpoints) if a.due(step, end)]
          if log.due(step) or due:  # the loss is checked before any eval / save
            last.update(log(step, checkpoints))
          if evaluation in due:
            last.update(evaluation(step, state, end))
          if checkpoints in due:
            checkpoints(step, state, evaluation.last if evaluation in due
                        else None)
          if end:
            break
      finally:
        run.ckpt.close()  # waits for the last save: CheckpointWriteError if it failed
    if stop.message(step, end):
      say(stop.message(step, end))
  finally:
    writer.close()
    run.lock.release()
    if isinstance(run.train_iter, DevicePrefetch):
      run.train_iter.close()
  last["step"] = step
  say(f"Done at step {step} after {(time.time() - start_time) / 60:.1f} min; "
      f"checkpoints in {run.ckpt.directory}")
  return last
