"""The training loop: steps, periodic evaluation, checkpoints, metrics.

``train_and_evaluate(config, workdir)`` runs (or resumes) one experiment:

1. tokenizer: trained on the training split, or loaded, at
   ``<workdir>/tokenizer/spm.model``; the model's vocab_size is set from it;
2. if ``<workdir>/checkpoints`` holds a checkpoint, the config is checked
   against it (an incompatible one is refused before anything in the
   workdir changes) and the run resumes from the newest checkpoint that
   restores (train state and input-iterator state: exactly the batches an
   uninterrupted run would see), or from ``checkpoint_step`` if given; newer
   steps are moved to ``<workdir>/checkpoints_set_aside/`` (never deleted);
3. the resolved config is written to ``<workdir>/config.json``;
4. the loop trains until ``num_train_steps`` or the wall-time budget
   ``max_minutes`` (the wall time of this launch: data preparation,
   compilation and, once a validation pass has been timed, the final
   evaluation included. The loop keeps back the time its last validation
   pass took, and its last BLEU pass's if one has run in this launch;
   without one, a run stopped by the budget ends without BLEU. The final
   checkpoint follows. A decaying
   schedule first fixes how many steps the budget holds, see
   ``plans_steps_from_time``) or SIGTERM
   (checkpoint, then exit 0; multi-host: agreed at log steps), evaluating the
   validation loss every ``eval_every_steps``, BLEU every
   ``eval_bleu_every_steps``, checkpointing every ``checkpoint_every_steps``
   and at the end, and logging every ``log_every_steps`` (console line,
   TensorBoard, ``metrics.jsonl``).

A NaN or Inf loss stops the run with ``NonFiniteLossError`` naming the step
and the last checkpoint written before it (losses are checked before every
checkpoint, so none is written after a non-finite loss).
"""

from __future__ import annotations

import json
import signal
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

import tokenizer as tokenizer_lib
from model import ConfigError, TransformerConfig
from train import checkpointing, evaluate, input_pipeline, interrupts, sharding
from train import workdir as workdir_lib
from train import steps as steps_lib
from train.batches import SyntheticBatches, SyntheticEval, trim_padding
from train.checkpointing import NonFiniteLossError
from train.metrics import MetricWriter, progress_line
from train.translation import DecodeOptions

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
  """(train iterator, validation data) of this process."""
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


def make_runner(config, model_config: TransformerConfig, devices=None):
  """The steps of config.optimizer / label_smoothing, placed by
  config.parallelism, config.mesh and config.logical_axis_rules.

  A decaying schedule needs its decay_steps (``train_and_evaluate`` fills
  them in from num_train_steps or from the time budget).
  """
  parts = steps_lib.build(model_config, config.optimizer,
                          config.label_smoothing)
  return sharding.make_runner(
      parts, config.batch_size, parallelism=config.parallelism,
      mesh_config=config.mesh, rules=config.logical_axis_rules,
      devices=devices)


def save_config(record: dict, workdir: epath.Path) -> None:
  """<workdir>/config.json, written atomically by the main process."""
  if sharding.is_main_process():
    tmp = workdir / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(record["experiment"], indent=2, sort_keys=True))
    tmp.replace(workdir / CONFIG_FILE)


# ---------------------------------------------------------------- evaluation

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


# ---------------------------------------------------------------- the loop's parts

class StopRequest:
  """SIGTERM (preemption) or the wall-time budget -> finish the step, save, exit."""

  def __init__(self, max_minutes: float, start_time: float):
    self.budget = max_minutes * 60 if max_minutes > 0 else float("inf")
    self.start_time = start_time
    # Seconds kept back for what follows the last step (the final
    # evaluation): the budget is the launch's wall time, the end included.
    self.reserve = 0.0
    self.signalled = ""
    self._previous = None

  def __enter__(self):
    try:
      self._previous = {s: signal.signal(s, self._handle)
                        for s in interrupts.SIGNALS}
    except ValueError:  # not the main thread
      self._previous = None
    return self

  def __exit__(self, *exc):
    for s, previous in (self._previous or {}).items():
      signal.signal(s, previous)

  def _handle(self, signum, frame):
    del frame
    interrupts.on_signal(signum, bool(self.signalled))
    self.signalled = f"signal {signal.Signals(signum).name}"

  def seconds_left(self) -> float:
    return self.budget - (time.time() - self.start_time)

  def requested(self, at_log_step: bool) -> bool:
    """Whether to stop now; every process agrees (checked at log steps)."""
    want = bool(self.signalled) or self.seconds_left() <= self.reserve
    if jax.process_count() == 1:
      return want
    if not at_log_step:
      return False
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return bool(np.any(multihost_utils.process_allgather(
        np.asarray(want, np.int32))))


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


# ---------------------------------------------------------------- a budget's step count

# Share of a budget that planning keeps back for what it does not time: BLEU
# decoding, checkpoint writes, a machine that slows down during the run.
BUDGET_MARGIN = 0.03
PROVISIONAL_DECAY_STEPS = 2**30


def plans_steps_from_time(config) -> bool:
  """Whether this launch fixes its step count by timing its first steps.

  A decaying schedule must know where it ends. With a wall-time budget
  (max_minutes) and no decay_steps, the loop times budget_timing_steps steps
  (after the first, which compiles) and one validation pass, then fixes
  num_train_steps = decay_steps to what the rest of the budget holds (never
  more than the config's num_train_steps). The timed steps fall inside the
  warm-up, whose learning rates do not depend on the step count, so the run
  is the same as one launched with that num_train_steps and no budget.
  """
  return (config.optimizer.schedule != "rsqrt" and
          config.optimizer.decay_steps == 0 and config.max_minutes > 0)


def configured_dropout(config) -> float:
  """model.dropout_rate, or the preset's where the config leaves it None."""
  rate = config.model.dropout_rate
  if rate is None:
    rate = TransformerConfig.preset(config.model_preset).dropout_rate
  return rate


def dropout_for_length(config, total_steps: int) -> float:
  """The dropout rate of a run of ``total_steps`` steps.

  A run of long_run_steps steps or more (0: never) trains with
  long_run_dropout_rate, a shorter one with the configured rate: short
  runs see the training data a few times and learn faster without dropout,
  long ones overfit without it.
  """
  if 0 < config.long_run_steps <= total_steps:
    return config.long_run_dropout_rate
  return configured_dropout(config)


def decides_dropout_from_time(config) -> bool:
  """Whether this launch times its first steps to choose its dropout.

  With a wall-time budget (max_minutes) the run's length is not known
  before it starts: where num_train_steps could reach long_run_steps and
  the two rates differ, the steps timed after the first (at the configured
  rate) and one validation pass tell how many the budget holds, and the
  run goes on with ``dropout_for_length`` of that (its train step compiles
  again).
  """
  return (config.max_minutes > 0 and
          0 < config.long_run_steps <= config.num_train_steps and
          config.long_run_dropout_rate != configured_dropout(config))


def with_dropout(config, rate: float, vocab_size: int):
  """Sets config.model.dropout_rate = rate; (model config, the checkpoints'
  config record, the runner, whose train step compiles anew) for it."""
  config.model.dropout_rate = rate
  model_config = model_config_for(config, vocab_size)
  return (model_config, checkpointing.config_record(config, model_config),
          make_runner(config, model_config))


def check_long_run(config) -> None:
  """ConfigError for impossible long_run_* settings, before any work."""
  if config.long_run_steps < 0:
    raise ConfigError(f"config.long_run_steps={config.long_run_steps}: use a "
                      "step count, or 0 for no long-run dropout")
  if not 0.0 <= config.long_run_dropout_rate < 1.0:
    raise ConfigError(f"config.long_run_dropout_rate="
                      f"{config.long_run_dropout_rate}: a dropout rate lies in "
                      "[0, 1)")
  if not decides_dropout_from_time(config):
    return
  if plans_steps_from_time(config):
    # The length would be fixed from steps timed at one rate and run at the
    # other (slower or faster): the budget would not hold it.
    raise ConfigError(
        f"config.long_run_steps={config.long_run_steps} with a "
        f"{config.optimizer.schedule} schedule and --config.max_minutes: the "
        "budget cannot fix both the schedule's length and the dropout; set "
        "--config.long_run_steps=0 (and --config.model.dropout_rate as "
        "wanted), or --config.optimizer.decay_steps")
  if config.budget_timing_steps < 1:
    raise ConfigError(
        f"config.budget_timing_steps={config.budget_timing_steps}: with "
        "--config.max_minutes and long_run_steps the run times at least 1 "
        "step to choose its dropout; or set --config.long_run_steps=0")


def with_provisional_length(config):
  """The config the timed steps run with: a decay too long to reach.

  Until the step count is fixed only the warm-up runs, whose learning rates
  do not depend on decay_steps.
  """
  provisional = ml_collections.ConfigDict(config.to_dict())
  provisional.optimizer.decay_steps = PROVISIONAL_DECAY_STEPS
  return provisional


def check_budget_timing(config) -> None:
  """ConfigError unless the timed steps end inside the warm-up."""
  timed, warmup = config.budget_timing_steps, config.optimizer.warmup_steps
  if config.num_train_steps <= warmup:
    raise ConfigError(
        f"config.num_train_steps={config.num_train_steps}: a "
        f"{config.optimizer.schedule} schedule decays after "
        f"optimizer.warmup_steps={warmup}; train for more steps")
  if timed < 1 or timed + 1 > warmup:
    raise ConfigError(
        f"config.budget_timing_steps={timed}: a {config.optimizer.schedule} "
        "schedule with --config.max_minutes times that many steps (after the "
        "compiling one) to fix the run's length, which must end within "
        f"optimizer.warmup_steps={warmup}: choose 1 to {warmup - 1}, or set "
        "optimizer.decay_steps (or num_train_steps with max_minutes=0)")


def steps_in_budget(seconds: float, step_seconds: float, eval_seconds: float,
                    eval_every: int, compile_seconds: float,
                    margin: float = BUDGET_MARGIN) -> int:
  """How many more train steps fit in ``seconds`` of wall time.

  Each step costs step_seconds and every eval_every-th one a validation pass
  more (eval_seconds); the train step compiles once more for the schedule of
  the fixed length (compile_seconds); ``margin`` of the time is kept back.
  """
  usable = seconds * (1.0 - margin) - compile_seconds
  per_step = step_seconds + (eval_seconds / eval_every if eval_every > 0
                             else 0.0)
  return max(0, int(usable // per_step))


def fix_length(config, model_config: TransformerConfig, workdir, total: int):
  """Sets num_train_steps = decay_steps = total and records it in
  config.json; returns (the checkpoints' config record, the runner of the
  schedule that ends there)."""
  config.num_train_steps = config.optimizer.decay_steps = total
  record = checkpointing.config_record(config, model_config)
  save_config(record, workdir)
  try:
    return record, make_runner(config, model_config)
  except ValueError as e:  # the schedule does not fit the length
    raise ConfigError(f"a run of {total} steps: {e}") from e


class StepTimer:
  """Times the steps of this launch after the first (which compiles)."""

  def __init__(self, first_step: int, timed_steps: int):
    self.compiled_at = first_step + 1
    self.done_at = first_step + 1 + timed_steps
    self.start = time.time()
    self.compile_seconds = 0.0
    self._t = 0.0

  def step_seconds(self, step: int, step_metrics) -> float | None:
    """Seconds per step once ``step`` is the last timed one, else None."""
    if step == self.compiled_at:
      jax.block_until_ready(step_metrics)
      self._t = time.time()
      self.compile_seconds = self._t - self.start
    elif step == self.done_at:
      jax.block_until_ready(step_metrics)
      return (time.time() - self._t) / (self.done_at - self.compiled_at)
    return None


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

def evaluated_params(state):
  """What validation scores (and the best checkpoint is chosen by): the
  params' moving average where the run keeps one (optimizer.ema_decay),
  else the params."""
  return state.params if state.ema_params is None else state.ema_params


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       checkpoint_step: int | None = None) -> dict[str, Any]:
  """Trains (or resumes) the experiment in ``workdir``; returns last metrics.

  checkpoint_step: resume from this step instead of the newest checkpoint.
  """
  start_time = time.time()
  # This run's copy: a budget may fix its step count (plans_steps_from_time).
  config = ml_collections.ConfigDict(config.to_dict())
  planned = plans_steps_from_time(config)
  # A length fixed from the budget already counts its evaluations (with a
  # margin): the stop keeps nothing back for them, so the run ends at the
  # step its schedule does.
  keep_back = not planned
  check_long_run(config)
  choose_dropout = decides_dropout_from_time(config)
  long_by_steps = 0 < config.long_run_steps <= config.num_train_steps
  if not choose_dropout and long_by_steps:   # the length: num_train_steps
    config.model.dropout_rate = config.long_run_dropout_rate
  if planned:
    check_budget_timing(config)
  elif config.optimizer.schedule != "rsqrt" and config.optimizer.decay_steps == 0:
    # Written out, so that the record says where the schedule ends.
    config.optimizer.decay_steps = config.num_train_steps
  try:  # refused before the workdir changes
    steps_lib.schedule_of(
        with_provisional_length(config).optimizer if planned
        else config.optimizer, config.model.d_model or 1)
    steps_lib.ema_decay_of(config.optimizer)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  model_config_for(config, config.data.vocab_size)  # before the tokenizer trains
  sharding.maybe_initialize_distributed(config.distributed)
  workdir = epath.Path(workdir)
  main = sharding.is_main_process()
  lock = workdir_lib.claim(workdir, not config.synthetic_data, main)
  say = (lambda msg: print(msg, flush=True)) if main else (lambda msg: None)

  say(f"Preparing data and tokenizer in {workdir} ...")
  tok, vocab_size = load_tokenizer(config, workdir)
  model_config = model_config_for(config, vocab_size)
  record = checkpointing.config_record(config, model_config)
  runner = make_runner(with_provisional_length(config) if planned else config,
                       model_config)
  ckpt = checkpointing.Checkpointer(
      workdir, config.checkpoint, bleu=config.eval_bleu_every_steps > 0,
      tokenizer=tok)
  train_iter, eval_data = make_data(config, tok, vocab_size)
  init_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))
  state = restore_or_init(ckpt, runner, train_iter, record, init_rng,
                          checkpoint_step, say)
  step = int(jax.device_get(runner.state_for_checkpoint(state).step))
  workdir_lib.check_steps_left(step, config.num_train_steps, ckpt.directory)
  saved = ckpt.restore_config(step) if step > 0 else None
  saved_dropout = saved["model"].get("dropout_rate") if saved else None
  if choose_dropout and saved_dropout == config.long_run_dropout_rate:
    # A long run stays one: a launch under a budget keeps its dropout.
    choose_dropout = False
    model_config, record, runner = with_dropout(config, saved_dropout,
                                                vocab_size)
    say(f"Dropout {saved_dropout:g}: the checkpoint of step {step} trained "
        "with long_run_dropout_rate")
  elif (saved_dropout is not None and not choose_dropout and
        saved_dropout != model_config.dropout_rate):
    say(f"Dropout {model_config.dropout_rate:g} from step {step + 1} (the "
        f"checkpoint of step {step} trained with {saved_dropout:g}"
        + (f"; long_run_steps={config.long_run_steps}" if long_by_steps
           else "") + ")")
  save_config(record, workdir)  # only once the config is known to fit
  say(f"Model: {model_config}")
  if planned and saved:
    fixed = saved["experiment"].get("optimizer", {}).get("decay_steps", 0)
    if fixed > 0:  # fixed by the launch that started the run: kept
      planned = False
      record, runner = fix_length(config, model_config, workdir, fixed)
      say(f"This run's length was fixed at {fixed} steps by the budget of its "
          f"first launch (its {config.optimizer.schedule} schedule ends "
          "there)" + (": it has trained them all. To train longer, start "
                        "a new --workdir with a larger --config.max_minutes"
                        if step >= fixed else ""))
    elif step + 1 + config.budget_timing_steps > config.optimizer.warmup_steps:
      raise ConfigError(
          f"the checkpoint of step {step} in {ckpt.directory} records no step "
          "count, and steps timed from there would end past optimizer."
          f"warmup_steps={config.optimizer.warmup_steps}: set "
          "--config.optimizer.decay_steps (the step the schedule ends at)")
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(
      runner.abstract_state().params))
  say(f"{num_params:,} parameters; step {step}; devices: "
      f"{jax.device_count()} ({jax.process_count()} processes), parallelism="
      f"{config.parallelism}")
  bleu = bleu_batches(config, tok, eval_data)

  writer = MetricWriter(workdir, enabled=main, start_step=step)
  metrics, last_metrics, last_eval = StepMetrics(), {}, {}
  last_good = ckpt.latest_step()
  total = config.num_train_steps
  timer = (StepTimer(step, config.budget_timing_steps)
           if planned or choose_dropout else None)
  if timer is not None and not planned:
    say(f"Training for {config.max_minutes:g} min: timing steps {step + 2}-"
        f"{timer.done_at} to choose the dropout ({model_config.dropout_rate:g}"
        f", or {config.long_run_dropout_rate:g} "
        f"if the budget holds long_run_steps={config.long_run_steps}; the "
        "first step compiles, it can take a while)")
  elif timer is not None:
    say(f"Training for {config.max_minutes:g} min: timing steps {step + 2}-"
        f"{timer.done_at} and a validation pass to fix the step count of the "
        f"{config.optimizer.schedule} schedule (the first step compiles; it "
        "can take a while)")
  else:
    say(f"Training to step {total}" + (f" or for {config.max_minutes:g} min"
                                        if config.max_minutes > 0 else "")
        + " (the first step compiles; it can take a while)")
  try:
    bleu_seconds, bleu_timed = 0.0, False   # the last BLEU pass's
    with StopRequest(config.max_minutes, start_time) as stop:
      while step < total:
        state, step_metrics = runner.train_step(
            state, runner.place_batch(next(train_iter)), dropout_rng)
        step += 1
        metrics.add(step, step_metrics)
        step_seconds = timer and timer.step_seconds(step, step_metrics)
        if step_seconds:   # planned or choose_dropout (never both)
          eval_start = time.time()
          last_eval = evaluate_loss(runner, evaluated_params(state),
                                    eval_data, config.num_eval_batches)
          eval_seconds = time.time() - eval_start
          writer.write(step, last_eval)
          fit = step + steps_in_budget(
              stop.seconds_left(), step_seconds, eval_seconds,
              config.eval_every_steps, timer.compile_seconds)
          if jax.process_count() > 1:  # every host trains the same steps
            from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
            fit = int(multihost_utils.broadcast_one_to_all(np.int32(fit)))
          timer = None
          if not planned:   # choose_dropout
            # At the timed rate: steps at the other run a few % slower or
            # faster (dropout 0.1: ~4% slower at d_model 192).
            rate = dropout_for_length(config, min(fit, config.num_train_steps))
            changes = rate != model_config.dropout_rate
            say(f"Timed: {step_seconds:.2f} s a step and {eval_seconds:.1f} s"
                f" a validation pass: the budget holds ~{fit} steps at "
                f"dropout {model_config.dropout_rate:g}, so dropout {rate:g}"
                + (f" from step {step + 1} (a run of long_run_steps="
                   f"{config.long_run_steps} or more)" if changes else ""))
            if changes:
              model_config, record, runner = with_dropout(config, rate,
                                                          vocab_size)
              save_config(record, workdir)
          else:
            total = min(fit, config.num_train_steps)
            if total <= config.optimizer.warmup_steps:
              raise ConfigError(
                  f"--config.max_minutes={config.max_minutes:g} holds {fit} "
                  f"steps at {step_seconds:.2f} s a step, no more than "
                  f"optimizer.warmup_steps={config.optimizer.warmup_steps}: "
                  "raise max_minutes or lower warmup_steps")
            # The new runner's train step compiles once more.
            record, runner = fix_length(config, model_config, workdir, total)
            say(f"Timed: {step_seconds:.2f} s a step, {eval_seconds:.1f} s a "
                "validation pass (eval_loss "
                f"{last_eval.get('eval_loss', 0):.4f}): the budget holds "
                f"{fit} steps" + (
                    "" if total == fit else
                    f", num_train_steps caps the run at {total}") + "; the "
                f"{config.optimizer.schedule} schedule ends at step "
                f"{total} (the same run: --config.num_train_steps={total} "
                "--config.max_minutes=0)")
        at_log_step = step % config.log_every_steps == 0
        finishing = step >= total or stop.requested(at_log_step)
        # On SIGTERM save first and fast: no final evaluation.
        evaluate_now = (step % config.eval_every_steps == 0 or
                        (finishing and not stop.signalled))
        save_now = step % config.checkpoint_every_steps == 0 or finishing
        if step == 1 or at_log_step or evaluate_now or save_now:
          # Fetching checks the loss: never evaluate or save after a NaN.
          scalars = metrics.flush(
              f"step {last_good} in {ckpt.directory}" if last_good is not None
              else "none")
          last_metrics.update(scalars)
          writer.write(step, scalars)
          rate = scalars.get("steps_per_sec", 0.0)
          eta = min((total - step) / rate if rate > 0 else float("inf"),
                    stop.seconds_left() - stop.reserve)
          say(progress_line(step, total, scalars, max(0.0, eta)))
          ckpt.check_for_errors()
        if evaluate_now:
          eval_start = time.time()
          last_eval = evaluate_loss(runner, evaluated_params(state),
                                    eval_data, config.num_eval_batches)
          loss_seconds = time.time() - eval_start
          # At a stop for the budget, BLEU only if a BLEU pass has been
          # timed: its time was kept back (stop.reserve), an untimed one's
          # (its searches compile) was not.
          if bleu and (step % config.eval_bleu_every_steps == 0 or
                       (finishing and (step >= total or bleu_timed))):
            bleu_start = time.time()
            last_eval.update(evaluate_bleu(
                model_config, runner.host_params(evaluated_params(state)), bleu,
                eval_data.references, tok, bleu_options(config)))
            bleu_seconds, bleu_timed = time.time() - bleu_start, True
          if keep_back:
            stop.reserve = loss_seconds + bleu_seconds
          last_metrics.update(last_eval)
          writer.write(step, last_eval)
          say(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in
                                           sorted(last_eval.items())))
        if save_now:
          ckpt.save(step, runner.state_for_checkpoint(state), train_iter,
                    record, metrics=last_eval if evaluate_now else None,
                    force=True)
          last_good = step
        if finishing:
          if stop.signalled:
            say(f"Stopping at step {step} on {stop.signalled}; checkpoint "
                "saved")
          elif step < total:
            say(f"Stopping at step {step}: wall-time budget of "
                f"{config.max_minutes:g} min used")
          break
  finally:
    try:
      ckpt.close()  # waits for the last save: CheckpointWriteError if it failed
    finally:
      writer.close()
      lock.release()
  last_metrics["step"] = step
  say(f"Done at step {step} after {(time.time() - start_time) / 60:.1f} min; "
      f"checkpoints in {ckpt.directory}")
  return last_metrics
