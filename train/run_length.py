"""A run's length and what it implies: its dropout, where its schedule ends.

The trainer trains to a step count (``num_train_steps``).
``for_fixed_length`` writes out what that count implies before training: a
decaying schedule's ``decay_steps`` and, for a run of ``long_run_steps`` or
more, ``long_run_dropout_rate``. With a wall-time budget (``max_minutes``)
``train.plan`` first fixes the count from timed steps; the checks here
refuse the combinations a budget cannot plan, before any work.
"""

from __future__ import annotations

import ml_collections

from model import ConfigError, TransformerConfig
from train import steps as steps_lib

PROVISIONAL_DECAY_STEPS = 2**30


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


def plans_steps_from_time(config) -> bool:
  """Whether a budget fixes where this run's decaying schedule ends.

  A decaying schedule must know where it ends. With a wall-time budget
  (max_minutes) and no decay_steps, ``train.plan`` times
  budget_timing_steps steps (after the first, which compiles) and one
  validation pass, then fixes num_train_steps = decay_steps to what the
  budget holds (never more than the config's num_train_steps).
  """
  return (config.optimizer.schedule != "rsqrt" and
          config.optimizer.decay_steps == 0 and config.max_minutes > 0)


def decides_dropout_from_time(config) -> bool:
  """Whether a budget decides this run's dropout.

  With a wall-time budget (max_minutes) the run's length is not known
  before it is planned: where num_train_steps could reach long_run_steps
  and the two rates differ, the steps ``train.plan`` times (at the
  configured rate) tell how many the budget holds, and the run trains with
  ``dropout_for_length`` of that.
  """
  return (config.max_minutes > 0 and
          0 < config.long_run_steps <= config.num_train_steps and
          config.long_run_dropout_rate != configured_dropout(config))


def check_long_run_values(config) -> None:
  """ConfigError for long_run_* values that mean nothing."""
  if config.long_run_steps < 0:
    raise ConfigError(f"config.long_run_steps={config.long_run_steps}: use a "
                      "step count, or 0 for no long-run dropout")
  if not 0.0 <= config.long_run_dropout_rate < 1.0:
    raise ConfigError(f"config.long_run_dropout_rate="
                      f"{config.long_run_dropout_rate}: a dropout rate lies in "
                      "[0, 1)")


def check_long_run(config) -> None:
  """ConfigError for impossible long_run_* settings, before any work."""
  check_long_run_values(config)
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


def check_budget_timing(config) -> None:
  """ConfigError unless a decaying schedule's planned length can work: past
  the warm-up, and its timed steps within it (their learning rates do not
  depend on where the schedule ends)."""
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


def with_provisional_length(config):
  """The config the timed steps run with: a decay too long to reach."""
  provisional = ml_collections.ConfigDict(config.to_dict())
  provisional.optimizer.decay_steps = PROVISIONAL_DECAY_STEPS
  return provisional


def check_schedule(config) -> None:
  """ConfigError for a schedule or moving average that cannot run."""
  try:
    steps_lib.schedule_of(config.optimizer, config.model.d_model or 1)
    steps_lib.ema_decay_of(config.optimizer)
  except ValueError as e:
    raise ConfigError(str(e)) from e


def for_fixed_length(config) -> ml_collections.ConfigDict:
  """A copy of ``config`` with what num_train_steps implies written out
  (so that the record says it): a decaying schedule's decay_steps and the
  dropout of a long run. ConfigError before any work if it cannot run."""
  config = ml_collections.ConfigDict(config.to_dict())
  check_long_run_values(config)
  if 0 < config.long_run_steps <= config.num_train_steps:
    config.model.dropout_rate = config.long_run_dropout_rate
  if config.optimizer.schedule != "rsqrt" and config.optimizer.decay_steps == 0:
    config.optimizer.decay_steps = config.num_train_steps
  check_schedule(config)
  return config
