"""Orbax checkpoints of a run: save, resume past a damaged step, restore on any mesh.

On-disk layout of a workdir (everything a user needs to evaluate or translate):

    <workdir>/
      config.json                  resolved experiment config of the last launch
      tokenizer/spm.model          joint SentencePiece model (tokenizer package)
      metrics.jsonl                one JSON object per logged step / evaluation
      metrics.superseded.jsonl     records of steps a resumed run trained again
      train.lock                   while a training runs: its host, pid, start
      tensorboard/                 TensorBoard event files (tensorboardX)
      checkpoints/<step>/          one Orbax composite checkpoint per saved step
        state/                     the train state (Orbax StandardSave, OCDBT)
        data/process_<i>-of-<n>.json   each host's input-iterator state (Grain)
        config/metadata            {"experiment": <config dict>, "model": <TransformerConfig dict>,
                                    "tokenizer": {"fingerprint": <16 hex digits>}}
        metrics/metrics            evaluation metrics at that step (best-of policy)
        _CHECKPOINT_METADATA
      checkpoints_set_aside/<step>/  a step newer than the one training
                                   resumed from (it did not restore, or
                                   --checkpoint chose an older one): moved,
                                   never deleted

The ``state`` item is a dict (documented names):

    step        int32 scalar: train_step calls done
    params      the model's params, names as in model/transformer.py, e.g.
                params/shared_embedding/embedding [vocab, d_model],
                params/encoder/layers_0/self_attention/query/kernel
                [d_model, heads, head_dim], params/decoder/layers_2/ffn/wi/kernel ...
    opt_state   Optax state (Adam mu / nu mirror params, plus counts)
    ema_params  only with optimizer.ema_decay > 0: the moving average of
                params, the same tree

With only ``orbax-checkpoint`` installed::

    import os, orbax.checkpoint as ocp
    root = os.path.abspath("<workdir>/checkpoints")       # Orbax wants absolute paths
    step = max(int(d) for d in os.listdir(root) if d.isdigit())   # the latest
    state = ocp.StandardCheckpointer().restore(f"{root}/{step}/state")
    state["params"]["shared_embedding"]["embedding"]

Loading for inference (params only, averaging, the tokenizer) is
``train.inference.load``.

Policies: keep the last ``config.checkpoint.max_to_keep`` checkpoints plus the
``keep_best`` best by ``best_metric``; saves are asynchronous and atomic
(written to a temporary directory, renamed when complete), so a process
killed during a save leaves the previous checkpoint restorable.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging as std_logging
import math
import os
import re
import sys
import warnings
from typing import Any, Sequence

import grain
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from model import TransformerConfig

STATE, DATA, CONFIG = "state", "data", "config"
CHECKPOINT_DIR = "checkpoints"


class IncompatibleCheckpointError(ValueError):
  """The workdir holds a checkpoint of a different model / optimiser / data."""


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or Inf."""


class CheckpointNotFoundError(FileNotFoundError):
  """No (restorable) checkpoint where one was asked for."""


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (disk full, permissions, ...)."""


class TokenizerMismatchError(IncompatibleCheckpointError):
  """The workdir's tokenizer is not the one its checkpoints were trained with."""


class DamagedCheckpointError(ValueError):
  """A step's files are incomplete (skipped like any that does not restore)."""

  def __init__(self, path):
    super().__init__(f"{path} is missing")
    self.path = str(path)


def checkpoint_dir(workdir) -> epath.Path:
  """<workdir>/checkpoints, absolute (Orbax refuses relative local paths)."""
  path = epath.Path(workdir)
  if "://" not in str(workdir):  # local, not gs:// or another file system
    path = epath.Path(os.path.abspath(os.fspath(path)))
  return path / CHECKPOINT_DIR


# Fields that must match to resume: they fix the shapes and structure of the
# state, or what the saved data iterator state means (a restored iterator
# yields the batches of an uninterrupted run only with the same data,
# batching, packing and seed).
STRUCTURAL_FIELDS = (
    "optimizer.grad_accum_steps", "optimizer.grad_clip_norm>0",
    "optimizer.weight_decay>0", "data.name", "data.source_lang",
    "data.target_lang", "data.train_split", "data.train_src_file",
    "data.train_tgt_file", "data.train_tsv_file", "data.max_len",
    "data.long_pairs", "data.seed", "data.num_packing_bins", "batch_size",
    "optimizer.ema_decay>0",
)


def best_metric_and_mode(checkpoint_config, bleu: bool) -> tuple[str, str]:
  """config.checkpoint's best_metric / best_mode with 'auto' resolved.

  'auto': eval_bleu when periodic BLEU is on (``bleu``), else eval_loss.
  Mode 'auto': 'max' for BLEU / chrF / accuracy, else 'min'.
  """
  name = checkpoint_config.best_metric
  if name == "auto":
    name = "eval_bleu" if bleu else "eval_loss"
  mode = checkpoint_config.best_mode
  if mode == "auto":
    mode = "max" if any(k in name for k in ("bleu", "chrf", "accuracy")) else "min"
  if mode not in ("min", "max"):
    raise ValueError(f"config.checkpoint.best_mode={mode!r}; use min, max or auto")
  return name, mode


def _structural(experiment: dict[str, Any]) -> dict[str, Any]:
  out = {}
  for field in STRUCTURAL_FIELDS:
    path, _, flag = field.partition(">")
    value: Any = experiment
    for part in path.split("."):
      value = value.get(part) if isinstance(value, dict) else None
    out[field] = (value or 0) > 0 if flag else value
  return out


# Model fields that only change how training perturbs the activations, not
# the params or the state: a run may resume with other values (a run that
# turns long gets its dropout then, run_length.dropout_for_length).
TRAINING_ONLY_MODEL_FIELDS = ("dropout_rate", "attention_dropout_rate",
                              "dropout_impl")


# How long to train: changed on purpose to continue a run, not worth a warning.
RUN_LENGTH_FIELDS = ("num_train_steps", "max_minutes")


def compare_configs(saved: dict[str, Any], current: dict[str, Any]
                    ) -> tuple[list[str], list[str]]:
  """(mismatches that forbid resuming, other differences), as readable lines.

  saved / current: {"experiment": config dict, "model": TransformerConfig dict}.
  """
  fatal, other = [], []
  # Through TransformerConfig: a field the checkpoint predates gets the value
  # the model had before the field existed.
  saved_model = TransformerConfig.from_dict(saved["model"]).to_dict()
  current_model = TransformerConfig.from_dict(current["model"]).to_dict()
  for key in sorted(set(saved_model) | set(current_model)):
    a, b = saved_model.get(key), current_model.get(key)
    if a != b:
      (other if key in TRAINING_ONLY_MODEL_FIELDS else fatal).append(
          f"model.{key}: checkpoint {a!r}, config {b!r}")
  sa, ca = _structural(saved["experiment"]), _structural(current["experiment"])
  for key in STRUCTURAL_FIELDS:
    if sa[key] != ca[key]:
      fatal.append(f"{key}: checkpoint {sa[key]!r}, config {ca[key]!r}")
  flat_a, flat_b = _flatten(saved["experiment"]), _flatten(current["experiment"])
  for key in sorted(set(flat_a) | set(flat_b)):
    if flat_a.get(key) != flat_b.get(key) and key not in RUN_LENGTH_FIELDS:
      other.append(f"{key}: checkpoint {flat_a.get(key)!r}, config "
                   f"{flat_b.get(key)!r}")
  return fatal, other


def _flatten(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_record(config, model_config: TransformerConfig) -> dict[str, Any]:
  """The JSON stored in each checkpoint's ``config`` item."""
  experiment = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  return json.loads(json.dumps({"experiment": experiment,
                                "model": model_config.to_dict()},
                               default=_json_default))


def _json_default(x):
  if isinstance(x, tuple):
    return list(x)
  if isinstance(x, (np.integer, np.floating)):
    return x.item()
  return str(x)


def state_to_dict(state) -> dict[str, Any]:
  d = {"step": state.step, "params": state.params,
       "opt_state": state.opt_state}
  if getattr(state, "ema_params", None) is not None:
    d["ema_params"] = state.ema_params
  return d


def state_from_dict(template, d):
  return template.replace(step=d["step"], params=d["params"],
                          opt_state=d["opt_state"],
                          ema_params=d.get("ema_params"))


class _FrozenIteratorState:
  """A snapshot of an iterator's state for Grain's handler (saved as JSON)."""

  def __init__(self, state):
    if isinstance(state, bytes):
      state = state.decode()
    self._json = state if isinstance(state, str) else json.dumps(state)

  def get_state(self) -> bytes:
    return self._json.encode()


class _IteratorAdapter:
  """Lets Grain's handler restore Grain or plain (dict-state) iterators."""

  def __init__(self, iterator):
    self.iterator = iterator

  def set_state(self, state: bytes):
    try:
      self.iterator.set_state(json.loads(state.decode()))
    except (TypeError, AttributeError, ValueError):
      self.iterator.set_state(state)

  def start_prefetch(self):
    if hasattr(self.iterator, "start_prefetch"):
      self.iterator.start_prefetch()


def _handlers():
  return {STATE: ocp.StandardCheckpointHandler(),
          DATA: grain.checkpoint.CheckpointHandler(),
          CONFIG: ocp.JsonCheckpointHandler()}


class _DropReadOnlyNotices:
  """A logging filter: Orbax warns at every read-only manager it opens (what
  evaluation and translation do on purpose), several lines each time."""

  def filter(self, record) -> bool:
    message = record.getMessage()
    return not ("read only" in message or "read_only=True" in message)


class _DropBackgroundSaveErrors:
  """A logging filter: a failed background save (a full disk) makes Orbax's
  threads log the same error a dozen times with tracebacks; the Checkpointer
  reports it once, as CheckpointWriteError, naming the cause and last step."""

  def filter(self, record) -> bool:
    return not (record.levelno >= std_logging.ERROR and
                "orbax" in (record.pathname or ""))


logging.get_absl_logger().addFilter(_DropReadOnlyNotices())
logging.get_absl_logger().addFilter(_DropBackgroundSaveErrors())


class Checkpointer:
  """The run's CheckpointManager with its policies (see module docstring).

  checkpoint_config: ``config.checkpoint`` (None: keep everything, save
  synchronously); bleu: whether the run scores validation BLEU (the 'auto'
  best metric).
  """

  def __init__(self, workdir, checkpoint_config=None, *, bleu: bool = False,
               read_only: bool = False, tokenizer=None):
    # Recorded in every checkpoint saved, checked at every restore.
    self.tokenizer_fingerprint = tokenizer.fingerprint if tokenizer else None
    ck = checkpoint_config
    self.best_metric, self.best_mode = (
        best_metric_and_mode(ck, bleu) if ck is not None
        else ("eval_loss", "min"))
    keep = ck.max_to_keep if ck is not None else None
    keep_best = ck.keep_best if ck is not None else 1
    metric, reverse = self.best_metric, self.best_mode == "min"
    worst = float("inf") if reverse else float("-inf")
    score = lambda m: m.get(metric, worst)  # steps saved without an eval: worst
    policy = policies.AnyPreservationPolicy([
        policies.LatestN(n=keep),
        policies.BestN(get_metric_fn=score, reverse=reverse,
                       n=keep_best, keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        best_fn=score, best_mode=self.best_mode,  # makes Orbax store metrics
        preservation_policy=None if read_only else policy,
        enable_async_checkpointing=bool(ck.async_save) if ck is not None else False,
        create=not read_only, read_only=read_only,
        cleanup_tmp_directories=not read_only)
    self.directory = checkpoint_dir(workdir)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=(STATE, DATA, CONFIG),
        item_handlers=_handlers())

  # -- queries
  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    """Best saved step by best_metric (None if no step has the metric)."""
    scored = []
    for step in self.all_steps():
      metrics = self.manager.metrics(step) or {}
      if self.best_metric in metrics:
        scored.append((metrics[self.best_metric], step))
    if not scored:
      return None
    pick = min if self.best_mode == "min" else max
    return pick(scored)[1]

  # -- save / restore
  def save(self, step: int, state, data_iterator, config_json: dict,
           metrics: dict[str, float] | None = None, force: bool = False) -> bool:
    """Starts an (async) save; the iterator state is snapshotted now."""
    best = {}
    if metrics and self.best_metric in metrics and math.isfinite(
        metrics[self.best_metric]):
      best = {self.best_metric: float(metrics[self.best_metric])}
    if self.tokenizer_fingerprint:
      config_json = {**config_json,
                     "tokenizer": {"fingerprint": self.tokenizer_fingerprint}}
    args = {STATE: ocp.args.StandardSave(state_to_dict(state)),
            CONFIG: ocp.args.JsonSave(config_json)}
    if data_iterator is not None:
      args[DATA] = grain.checkpoint.CheckpointSave(
          _FrozenIteratorState(data_iterator.get_state()))
    with self._writing():
      return self.manager.save(step, args=ocp.args.Composite(**args),
                               metrics=best, force=force)

  @contextlib.contextmanager
  def _writing(self):
    """Turns any failure of a (background) save into one CheckpointWriteError
    naming the cause and the newest complete checkpoint."""
    try:
      yield
    except CheckpointWriteError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      cause = e
      while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__
      text = (str(cause).strip() or repr(cause)).splitlines()[0]
      if len(text) > 300:  # tensorstore names every path; keep both ends
        text = f"{text[:140]} ... {text[-150:]}"
      done = complete_steps(self.directory)
      raise CheckpointWriteError(
          f"saving a checkpoint in {self.directory} failed: "
          f"{type(cause).__name__}: {text}. The "
          "newest complete checkpoint is "
          + (f"step {done[-1]}" if done else "none")
          + "; free space (or fix the cause) and rerun to resume from it."
      ) from None

  def restore_config(self, step: int) -> dict[str, Any]:
    return self.manager.restore(
        step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[CONFIG]

  def restore(self, step: int, abstract_state, data_iterator=None):
    """State onto abstract_state's shardings; the iterator restored in place.

    abstract_state: a TrainState of ``jax.ShapeDtypeStruct`` with shardings
    (``Runner.abstract_state()``): any mesh, whatever the saving mesh was.
    """
    check_complete(self.directory, step)
    args = {STATE: ocp.args.StandardRestore(state_to_dict(abstract_state))}
    if data_iterator is not None:
      args[DATA] = grain.checkpoint.CheckpointRestore(
          _IteratorAdapter(data_iterator))
    restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    return state_from_dict(abstract_state, restored[STATE])

  def reload(self):
    """Re-reads the directory (after checkpoints were moved away)."""
    self.manager.reload()

  def check_for_errors(self):
    """Raises now if an earlier async save failed.

    Orbax otherwise reports a failed background save only at the next save
    or ``wait``, which can be the end of a long run.
    """
    with self._writing():
      self.manager.check_for_errors()

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    """Waits for a pending save, then releases the manager."""
    try:
      with self._writing():
        self.manager.wait_until_finished()
    finally:
      self.manager.close()


def check_compatible(checkpointer: Checkpointer, step: int,
                     current: dict[str, Any], warn: bool = True
                     ) -> dict[str, Any]:
  """The checkpoint's config record; IncompatibleCheckpointError naming
  every mismatched field, or TokenizerMismatchError if it records another
  tokenizer. ``warn``: log the config changes that do not prevent a resume."""
  saved = checkpointer.restore_config(step)
  check_tokenizer(saved, checkpointer.tokenizer_fingerprint,
                  checkpointer.directory, step)
  fatal, other = compare_configs(saved, current)
  if fatal:
    raise IncompatibleCheckpointError(
        f"{checkpointer.directory} holds a checkpoint (step {step}) of an "
        "incompatible config:\n  " + "\n  ".join(fatal) +
        "\nUse a new --workdir, or set these fields back to the checkpoint's "
        "values to resume.")
  if other and warn:
    logging.warning("Resuming step %d with config changes: %s", step,
                    "; ".join(other))
  return saved


def check_tokenizer(record: dict[str, Any], fingerprint: str | None,
                    directory, step: int) -> None:
  """TokenizerMismatchError if ``record`` (a checkpoint's config record)
  names a tokenizer other than ``fingerprint`` (the workdir's). A record
  without one (older checkpoints, synthetic data) matches any."""
  saved = (record.get("tokenizer") or {}).get("fingerprint")
  if saved and fingerprint and saved != fingerprint:
    path = epath.Path(directory).parent / "tokenizer" / "spm.model"
    raise TokenizerMismatchError(
        f"{path} (fingerprint {fingerprint}) is not the tokenizer the "
        f"checkpoint of step {step} in {directory} was trained with "
        f"(fingerprint {saved}): put that one back, or use a new --workdir")


# ---------------------------------------------------------------- fallback

# A step's state without its pytree metadata cannot be restored into a
# train state (Orbax cannot tell the optimizer state's tuples from lists), so
# it counts as damaged for training and inference alike.
REQUIRED_FILES = ("state/_METADATA",)


def check_complete(directory, step: int) -> None:
  """DamagedCheckpointError naming a file the step lacks."""
  for name in REQUIRED_FILES:
    path = epath.Path(directory) / str(step) / name
    if not path.exists():
      raise DamagedCheckpointError(path)

def require_step(directory, steps: Sequence[int] | None, wanted: int | None
                 ) -> None:
  """CheckpointNotFoundError unless ``wanted`` (None: any) is among
  ``steps`` (None: the complete steps in ``directory``)."""
  if wanted is None:
    return
  steps = complete_steps(epath.Path(directory)) if steps is None else steps
  if wanted not in steps:
    raise CheckpointNotFoundError(
        f"no checkpoint of step {wanted} in {directory}; steps: "
        f"{list(steps) or 'none'}")


def restore_newest(directory, steps: Sequence[int], wanted: int | None,
                   restore) -> tuple[int, Any, list[int]]:
  """(step, restore(step), newer steps skipped) for the step to resume from.

  wanted: that step exactly (CheckpointNotFoundError if it is not there);
  None: the newest step whose ``restore(step)`` succeeds, skipping (with a
  warning naming the step and the error) those that fail. An
  IncompatibleCheckpointError is never skipped. Nothing is deleted.
  """
  if wanted is not None:
    require_step(directory, steps, wanted)
    return wanted, restore(wanted), []
  skipped = []
  for step in sorted(steps, reverse=True):
    try:
      return step, restore(step), skipped
    except IncompatibleCheckpointError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      # Orbax raises many types for damaged files (ValueError, OSError,
      # KeyError, tensorstore errors); each is reported, then skipped.
      warn_skipped(step, directory, e)
      skipped.append(step)
  raise CheckpointNotFoundError(
      f"none of the checkpoints in {directory} restores (steps "
      f"{sorted(steps)}); see the warnings above for each step's error")


def complete_steps(directory: epath.Path) -> list[int]:
  """Steps whose checkpoint finished writing (Orbax writes under a temporary
  name and renames a step's directory to the bare number when complete)."""
  if not directory.exists():
    return []
  return sorted(int(p.name) for p in directory.iterdir()
                if p.name.isdigit() and p.is_dir())


def set_aside(directory: epath.Path, step: int) -> epath.Path:
  """Moves a step out of the manager's sight (never deletes it)."""
  target = directory.parent / "checkpoints_set_aside" / str(step)
  target.parent.mkdir(parents=True, exist_ok=True)
  if target.exists():
    target = target.parent / f"{step}.{os.getpid()}"
  (directory / str(step)).rename(target)
  return target


def warn_skipped(step: int, directory, error: BaseException) -> None:
  """One line on stderr: which step was skipped, its file and the reason;
  or, for a step that is gone (a training running in the workdir pruned it
  while it was read), that it was removed."""
  path = epath.Path(directory) / str(step)
  if not path.exists():
    line = (f"warning: skipping checkpoint step {step}: {path} was removed "
            "while it was read (a training running in this workdir keeps "
            "only its newest checkpoints)")
  else:
    where, reason = describe_restore_error(error)
    line = (f"warning: skipping checkpoint step {step}, which does not "
            f"restore: {where or path}: {reason}")
  # One write, so another thread's output cannot land inside the line.
  sys.stderr.write(line + "\n")
  sys.stderr.flush()


# Where TensorStore's messages turn from the reason into its spec or repr.
_NOISE = ("[tensorstore_spec", " See full TensorStore details",
          "<bound method", "TensorStore({")


def describe_restore_error(error: BaseException) -> tuple[str | None, str]:
  """(the damaged file if the error names one, the reason in a few words)
  from an exception Orbax or TensorStore raised while restoring."""
  if isinstance(error, DamagedCheckpointError):
    return error.path, "missing"
  text = str(error).strip() or type(error).__name__
  files = re.findall(r'local file "([^"]+)"', text)
  base = re.search(r"'path': '(/[^']+)'", text)
  array = re.search(r"'path': '([^/'][^']*?)/?'", text)
  text = _brief(text)
  kind = type(error).__name__
  if "while reading array" in text and array:
    reason = f"array {array[1]} does not read"
    cause = error.__cause__
    if cause is not None and str(cause).strip():
      # TensorStore's own error (its status: OUT_OF_RANGE, DATA_LOSS,
      # PERMISSION_DENIED, RESOURCE_EXHAUSTED...) says why.
      files += re.findall(r'local file "([^"]+)"', str(cause))
      reason += f": {_brief(str(cause))}"
      kind = type(cause).__name__
  else:
    reason = text
  where = files[-1] if files else (base[1] if base else None)
  if len(reason) > 240:
    reason = reason[:240] + " ..."
  return where, f"{reason} ({kind})"


def _brief(text: str) -> str:
  """An Orbax or TensorStore message without the spec or repr it carries
  and without its 'local file' part (the file is named on its own): the
  last two of its ': '-separated parts."""
  for cut in _NOISE:
    text = text.split(cut)[0]
  text = " ".join(text.split()).rstrip(" .:")
  parts = [p for p in text.split(": ") if "local file" not in p]
  return ": ".join(parts[-2:]) if parts else text


# A file of Orbax's or TensorStore's, and the form of TensorStore's errors
# (an absl status: 'OUT_OF_RANGE: Error reading ...').
_LIBRARY_FILE = re.compile(r"[/\\](orbax|tensorstore)[/\\]")
_TENSORSTORE_STATUS = re.compile(r"[A-Z][A-Z_]{3,}: ")


def _from_checkpoint_io(error: BaseException | None) -> bool:
  """Whether an error, or one it was raised from, came out of Orbax or
  TensorStore."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if _TENSORSTORE_STATUS.match(str(error)):
      return True
    frame = error.__traceback__
    while frame is not None:
      if _LIBRARY_FILE.search(frame.tb_frame.f_code.co_filename):
        return True
      frame = frame.tb_next
    error = error.__cause__ or error.__context__
  return False


def _is_debris(unraisable) -> bool:
  """Whether an unraisable error is left by an abandoned Orbax operation: a
  TensorStore callback firing on the closed asyncio loop, or an Orbax
  coroutine collected unfinished, whose closing Orbax turns into an Exception
  carrying TensorStore's whole spec (~130 lines an array)."""
  value = unraisable.exc_value
  if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
    return True
  code = getattr(unraisable.object, "cr_code", None)
  return (inspect.iscoroutine(unraisable.object) and code is not None and
          bool(_LIBRARY_FILE.search(code.co_filename)))


class _DropUnretrievedErrors(std_logging.Filter):
  """Drops asyncio's "Task/Future exception was never retrieved" (and
  "unhandled exception during asyncio.run() shutdown") for Orbax's and
  TensorStore's errors: the sibling reads of one that failed, whose failure
  the restore or save already raised."""

  def filter(self, record):
    error = record.exc_info[1] if record.exc_info else None
    return not (error is not None and _from_checkpoint_io(error) and
                ("never retrieved" in str(record.msg) or
                 "shutdown" in str(record.msg)))


def _orbax_coroutine_names() -> list[str]:
  """The qualified names of the coroutine functions of Orbax's loaded
  modules (and of their classes): those its reads and writes leave unawaited
  when one of them fails."""
  names = set()
  for name, module in list(sys.modules.items()):
    if not name.startswith("orbax.") or module is None:
      continue
    for value in list(vars(module).values()):
      members = vars(value).values() if isinstance(value, type) else [value]
      for member in members:
        # Not the bare one-word names (read, write, exists): a coroutine of
        # the project's own could share them.
        if (inspect.iscoroutinefunction(member) and
            getattr(member, "__module__", "").startswith("orbax.") and
            ("." in member.__qualname__ or "_" in member.__qualname__)):
          names.add(member.__qualname__)
  return sorted(names)


def quiet_abandoned_checkpoint_io() -> None:
  """Drops what an abandoned Orbax read or write leaves behind.

  A failing save (a full disk) or a restore of a damaged step leaves, or
  not (it depends on the threads' timing), three kinds of debris around the
  one useful message (CheckpointWriteError, or the warning of
  ``warn_skipped``): unraisable errors of callbacks and coroutines, asyncio's
  "exception was never retrieved" logs of the sibling reads, and
  RuntimeWarnings of coroutines never awaited. A 12-layer model's failed
  restore printed from 1 to 5,822 lines. Each channel is filtered to Orbax's
  and TensorStore's debris; everything else prints as usual. Called by every
  command's entry point; installing it twice is harmless.
  """
  default = sys.unraisablehook
  if getattr(default, "quiets_checkpoint_io", False):
    return

  def hook(unraisable):
    if not _is_debris(unraisable):
      default(unraisable)
  hook.quiets_checkpoint_io = True
  sys.unraisablehook = hook
  std_logging.getLogger("asyncio").addFilter(_DropUnretrievedErrors())
  names = "|".join(re.escape(name) for name in _orbax_coroutine_names())
  if names:
    warnings.filterwarnings(
        "ignore", message=f"coroutine '({names})' was never awaited",
        category=RuntimeWarning)
