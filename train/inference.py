"""Loads a trained model for inference, once: config, tokenizer, params.

    loaded = load(workdir, checkpoint="latest", average_last=0)
    loaded.model_config, loaded.params, loaded.tokenizer, loaded.steps
    loaded.experiment_config   # the run's ml_collections config, from the checkpoint

The one loading path of ``train.evaluate``, ``train.choose``,
``train.translate``, ``train.inspect`` and ``train.export``. It opens the workdir's checkpoints
read-only once, resolves the step once, reads each checkpoint's params once
(never the optimizer state) and the tokenizer once.

``checkpoint``: "latest" (the newest checkpoint that restores: a damaged one
is skipped with a warning naming its step and error, and nothing is
deleted), "best" (by the run's best metric on the validation split, the
latest if none has it) or a step number (that step, or an error).
``average_last=N > 1``: the element-wise mean of the last N restorable
checkpoints up to and including the chosen one (accumulated in float64).
``ema=True``: the moving average of the params that a run with
``optimizer.ema_decay`` > 0 keeps in each checkpoint, in place of the params
(averaged too with ``average_last``).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

import tokenizer as tokenizer_lib
from model import TransformerConfig, init_params
from train import checkpointing
from train.checkpointing import CheckpointNotFoundError


class LoadedModel(NamedTuple):
  model_config: TransformerConfig
  params: Any
  experiment_config: ml_collections.ConfigDict  # the run's config
  steps: list[int]         # the checkpoint step(s) whose params these are
  tokenizer: tokenizer_lib.Tokenizer
  ema: bool = False        # the params' moving average (optimizer.ema_decay)
  workdir: str = ""        # the run's directory


def parse_checkpoint(value: str) -> str | int:
  """"latest", "best" or a step number; ValueError otherwise."""
  if value in ("latest", "best"):
    return value
  try:
    step = int(value)
  except ValueError:
    raise ValueError(f"--checkpoint={value!r}: use latest, best or a step "
                     "number") from None
  if step < 0:
    raise ValueError(f"--checkpoint={value}: a step number is >= 0")
  return step


def check_workdir(workdir, need_tokenizer: bool = True) -> list[int]:
  """The workdir's checkpoint steps; CheckpointNotFoundError naming what is missing."""
  path = epath.Path(workdir)
  if not path.exists():
    raise CheckpointNotFoundError(
        f"--workdir={workdir}: no such directory; pass the directory a "
        "training run wrote (python -m train --workdir=...)")
  directory = checkpointing.checkpoint_dir(workdir)
  steps = checkpointing.complete_steps(directory)
  if not steps:
    raise CheckpointNotFoundError(
        f"--workdir={workdir}: no checkpoint in {directory}; train first "
        "(python -m train --workdir=...) or pass the workdir of a trained run")
  if need_tokenizer and not tokenizer_lib.model_path(workdir).exists():
    raise CheckpointNotFoundError(
        f"--workdir={workdir}: no tokenizer at "
        f"{tokenizer_lib.model_path(workdir)}; the workdir is incomplete")
  return steps


class _Reader:
  """One read-only manager over a workdir's checkpoints: configs and params."""

  # Tries at listing the steps while a training prunes them.
  LISTING_TRIES = 5

  def __init__(self, workdir):
    self.directory = checkpointing.checkpoint_dir(workdir)
    for tries_left in reversed(range(self.LISTING_TRIES)):
      try:
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(read_only=True),
            item_names=(checkpointing.STATE, checkpointing.CONFIG),
            item_handlers={checkpointing.STATE: ocp.PyTreeCheckpointHandler(),
                           checkpointing.CONFIG: ocp.JsonCheckpointHandler()})
        return
      except FileNotFoundError as e:
        # A training running in this workdir removed a step (its newest
        # max_to_keep are kept) between Orbax's listing and its reading of
        # that step's metadata: list again.
        if not tries_left or not str(e.filename or "").startswith(
            str(self.directory)):
          raise

  def record(self, step: int) -> dict[str, Any]:
    return self.manager.restore(step, args=ocp.args.Composite(**{
        checkpointing.CONFIG: ocp.args.JsonRestore()}))[checkpointing.CONFIG]

  def params(self, step: int, model_config: TransformerConfig,
             ema: bool = False):
    """The params (or with ``ema`` their moving average) of ``step`` on the
    first local device (nothing else read)."""
    item = "ema_params" if ema else "params"
    checkpointing.check_complete(self.directory, step)  # as training does
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shapes = jax.eval_shape(lambda rng: init_params(model_config, rng),
                            jax.random.key(0))
    target = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
        shapes)
    restore_args = jax.tree.map(
        lambda _: ocp.ArrayRestoreArgs(sharding=sharding), shapes)
    restored = self.manager.restore(step, args=ocp.args.Composite(**{
        checkpointing.STATE: ocp.args.PyTreeRestore(
            item={item: target}, restore_args={item: restore_args},
            partial_restore=True)}))
    return restored[checkpointing.STATE][item]

  def model(self, step: int, ema: bool = False):
    """(model config, experiment config dict, params) of one step."""
    record = self.record(step)
    model_config = TransformerConfig.from_dict(record["model"])
    if ema and not has_ema(record["experiment"]):
      raise NoMovingAverageError(
          f"checkpoint step {step} in {self.directory} has no moving average "
          "of the params (its run had optimizer.ema_decay=0); drop --ema")
    return (model_config, record["experiment"],
            self.params(step, model_config, ema))

  def best_step(self, steps: Sequence[int], experiment: dict) -> int | None:
    """The best step by the run's best metric (None if no step has it)."""
    config = ml_collections.ConfigDict(experiment)
    metric, mode = checkpointing.best_metric_and_mode(
        config.checkpoint, bleu=config.get("eval_bleu_every_steps", 0) > 0)
    scored = []
    for step in steps:
      value = (self.manager.metrics(step) or {}).get(metric)
      if value is not None:
        scored.append((value, step))
    if not scored:
      logging.warning("No checkpoint has %s; using the latest.", metric)
      return None
    return (min if mode == "min" else max)(scored)[1]


def _newest_record(workdir, need_tokenizer: bool
                   ) -> tuple[epath.Path, int, dict[str, Any]]:
  """(checkpoint directory, step, config record) of the newest checkpoint
  whose record reads."""
  steps = check_workdir(workdir, need_tokenizer=need_tokenizer)
  reader = _Reader(workdir)
  step, record, _ = checkpointing.restore_newest(reader.directory, steps,
                                                 None, reader.record)
  return reader.directory, step, record


def run_config(workdir) -> ml_collections.ConfigDict:
  """The run's experiment config, from its newest checkpoint that has one."""
  _, _, record = _newest_record(workdir, need_tokenizer=False)
  return ml_collections.ConfigDict(record["experiment"])


def check_tokenizer(workdir) -> dict[str, Any]:
  """Before a model loads: TokenizerFileError if the workdir's tokenizer
  does not load, TokenizerMismatchError if its newest checkpoint that
  restores records another tokenizer. Returns that checkpoint's record."""
  tok = tokenizer_lib.load(tokenizer_lib.model_path(workdir))
  directory, step, record = _newest_record(workdir, need_tokenizer=True)
  checkpointing.check_tokenizer(record, tok.fingerprint, directory, step)
  return record


class NoMovingAverageError(checkpointing.IncompatibleCheckpointError):
  """--ema asked of a run that kept no moving average of its params (never
  skipped as a damaged checkpoint would be)."""


def has_ema(experiment: dict) -> bool:
  """Whether a run (its experiment config dict) keeps a params average."""
  return (experiment.get("optimizer", {}).get("ema_decay") or 0) > 0


def load(workdir, checkpoint: str | int = "latest",
         average_last: int = 0, ema: bool = False) -> LoadedModel:
  """Model config, params (of one step, or averaged) and tokenizer of a run."""
  check_workdir(workdir)
  model_config, experiment, params, used = load_params(workdir, checkpoint,
                                                       average_last, ema)
  tok = tokenizer_lib.load(tokenizer_lib.model_path(workdir))
  if tok.vocab_size > model_config.vocab_size:
    raise ValueError(f"the tokenizer in {workdir} has {tok.vocab_size} ids but "
                     f"the model only {model_config.vocab_size}: they are not "
                     "from the same run")
  return LoadedModel(model_config, params,
                     ml_collections.ConfigDict(experiment), used, tok, ema,
                     str(workdir))


def load_params(workdir, checkpoint: str | int = "latest",
                average_last: int = 0, ema: bool = False
                ) -> tuple[TransformerConfig, dict, Any, list[int]]:
  """(model config, experiment config dict, params, steps used), no tokenizer."""
  steps = check_workdir(workdir, need_tokenizer=False)
  reader = _Reader(workdir)
  wanted = checkpoint if isinstance(checkpoint, int) else None
  model_of = lambda step: reader.model(step, ema)
  step, (model_config, experiment, params), _ = checkpointing.restore_newest(
      reader.directory, steps, wanted, model_of)
  if checkpoint == "best":
    best = reader.best_step([s for s in steps if s <= step], experiment)
    if best is not None and best != step:
      step, (model_config, experiment, params), _ = (
          checkpointing.restore_newest(reader.directory, steps, best,
                                       model_of))
  used = [step]
  if average_last > 1:
    params, used = _average(reader, model_config, params, step,
                            [s for s in steps if s < step], average_last, ema)
  logging.info("Loaded params of step(s) %s from %s", used, reader.directory)
  return model_config, experiment, params, used


def _average(reader: _Reader, model_config, params, step: int,
             earlier: list[int], n: int, ema: bool = False
             ) -> tuple[Any, list[int]]:
  """Mean of ``params`` (of ``step``) and the newest restorable earlier steps.

  Each checkpoint is read once and accumulated in float64 (memory: two
  copies of the params), so N copies of one checkpoint average to it exactly.
  """
  total = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  used = [step]
  for s in sorted(earlier, reverse=True):
    if len(used) == n:
      break
    try:
      more = reader.params(s, model_config, ema)
    except Exception as e:  # pylint: disable=broad-except
      checkpointing.warn_skipped(s, reader.directory, e)
      continue
    total = jax.tree.map(lambda t, x: t + np.asarray(x, np.float64), total,
                         more)
    used.insert(0, s)
  if len(used) < n:
    logging.warning("--average_last=%d but only %d restorable checkpoints up "
                    "to step %d (%s): averaging those.", n, len(used), step,
                    used)
  return jax.tree.map(lambda x: (x / len(used)).astype(np.float32),
                      total), used


def average_checkpoints(workdir, steps: Sequence[int]):
  """Element-wise mean of the params of the given steps (float64 sums)."""
  reader = _Reader(workdir)
  steps = sorted(steps)
  model_config, _, params = reader.model(steps[-1])
  return _average(reader, model_config, params, steps[-1], steps[:-1],
                  len(steps))[0]


def checkpoint_tag(steps: Sequence[int], ema: bool = False) -> str:
  """step<N>, or avg<k>_step<first>-<last> for averaged params (file names);
  ema_ before either for the params' moving average."""
  tag = (f"step{steps[0]}" if len(steps) == 1
         else f"avg{len(steps)}_step{steps[0]}-{steps[-1]}")
  return f"ema_{tag}" if ema else tag
