"""Orbax checkpoints of a run: save, resume, restore elsewhere, load for inference.

On-disk layout of a workdir (everything a user needs to evaluate or translate):

    <workdir>/
      config.json                  resolved experiment config of the last launch
      tokenizer/spm.model          joint SentencePiece model (tokenizer package)
      metrics.jsonl                one JSON object per logged step / evaluation
      tensorboard/                 TensorBoard event files (tensorboardX)
      checkpoints/<step>/          one Orbax composite checkpoint per saved step
        state/                     the train state (Orbax StandardSave, OCDBT)
        data/process_<i>-of-<n>.json   each host's input-iterator state (Grain)
        config/metadata            {"experiment": <config dict>, "model": <TransformerConfig dict>}
        metrics/metrics            evaluation metrics at that step (best-of policy)
        _CHECKPOINT_METADATA

The ``state`` item is a dict (documented names):

    step        int32 scalar: train_step calls done
    params      the model's params, names as in model/transformer.py, e.g.
                params/shared_embedding/embedding [vocab, d_model],
                params/encoder/layers_0/self_attention/query/kernel
                [d_model, heads, head_dim], params/decoder/layers_2/ffn/wi/kernel ...
    opt_state   Optax state (Adam mu / nu mirror params, plus counts)

With only ``orbax-checkpoint`` installed::

    import orbax.checkpoint as ocp
    state = ocp.StandardCheckpointer().restore("<workdir>/checkpoints/<step>/state")
    state["params"]["shared_embedding"]["embedding"]

Policies: keep the last ``config.checkpoint.max_to_keep`` checkpoints plus the
``keep_best`` best by ``best_metric``; saves are asynchronous and atomic
(written to a temporary directory, renamed when complete), so a process
killed during a save leaves the previous checkpoint restorable.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Sequence

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from model import TransformerConfig, init_params

STATE, DATA, CONFIG = "state", "data", "config"
CHECKPOINT_DIR = "checkpoints"


class IncompatibleCheckpointError(ValueError):
  """The workdir holds a checkpoint of a different model / optimiser / data."""


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or Inf."""


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
)


def best_metric_and_mode(config) -> tuple[str, str]:
  """config.checkpoint.best_metric/best_mode with 'auto' resolved.

  'auto': eval_bleu when periodic BLEU is on (eval_bleu_every_steps > 0),
  else eval_loss. Mode 'auto': 'max' for BLEU / chrF / accuracy, else 'min'.
  """
  name = config.checkpoint.best_metric
  if name == "auto":
    name = "eval_bleu" if config.get("eval_bleu_every_steps", 0) > 0 else "eval_loss"
  mode = config.checkpoint.best_mode
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


def compare_configs(saved: dict[str, Any], current: dict[str, Any]
                    ) -> tuple[list[str], list[str]]:
  """(mismatches that forbid resuming, other differences), as readable lines.

  saved / current: {"experiment": config dict, "model": TransformerConfig dict}.
  """
  fatal = []
  # A field the checkpoint predates counts as its default (what the model
  # did before the field existed).
  defaults = {f.name: f.default for f in dataclasses.fields(TransformerConfig)}
  for key in sorted(set(saved["model"]) | set(current["model"])):
    a = saved["model"].get(key, defaults.get(key))
    b = current["model"].get(key, defaults.get(key))
    if a != b:
      fatal.append(f"model.{key}: checkpoint {a!r}, config {b!r}")
  sa, ca = _structural(saved["experiment"]), _structural(current["experiment"])
  for key in STRUCTURAL_FIELDS:
    if sa[key] != ca[key]:
      fatal.append(f"{key}: checkpoint {sa[key]!r}, config {ca[key]!r}")
  other = []
  flat_a, flat_b = _flatten(saved["experiment"]), _flatten(current["experiment"])
  for key in sorted(set(flat_a) | set(flat_b)):
    if flat_a.get(key) != flat_b.get(key):
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
  return {"step": state.step, "params": state.params,
          "opt_state": state.opt_state}


def state_from_dict(template, d):
  return template.replace(step=d["step"], params=d["params"],
                          opt_state=d["opt_state"])


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


logging.get_absl_logger().addFilter(_DropReadOnlyNotices())


class Checkpointer:
  """The run's CheckpointManager with its policies (see module docstring)."""

  def __init__(self, workdir, config=None, *, read_only: bool = False):
    ck = config.checkpoint if config is not None else None
    self.best_metric, self.best_mode = (
        best_metric_and_mode(config) if config is not None else ("eval_loss", "min"))
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
    args = {STATE: ocp.args.StandardSave(state_to_dict(state)),
            CONFIG: ocp.args.JsonSave(config_json)}
    if data_iterator is not None:
      args[DATA] = grain.checkpoint.CheckpointSave(
          _FrozenIteratorState(data_iterator.get_state()))
    return self.manager.save(step, args=ocp.args.Composite(**args),
                             metrics=best, force=force)

  def restore_config(self, step: int) -> dict[str, Any]:
    return self.manager.restore(
        step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[CONFIG]

  def restore(self, step: int, abstract_state, data_iterator=None):
    """State onto abstract_state's shardings; the iterator restored in place.

    abstract_state: a TrainState of ``jax.ShapeDtypeStruct`` with shardings
    (``Runner.abstract_state()``): any mesh, whatever the saving mesh was.
    """
    args = {STATE: ocp.args.StandardRestore(state_to_dict(abstract_state))}
    if data_iterator is not None:
      args[DATA] = grain.checkpoint.CheckpointRestore(
          _IteratorAdapter(data_iterator))
    restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    return state_from_dict(abstract_state, restored[STATE])

  def check_for_errors(self):
    """Raises now if an earlier async save failed.

    Orbax otherwise reports a failed background save only at the next save
    or ``wait``, which can be the end of a long run.
    """
    self.manager.check_for_errors()

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def check_compatible(checkpointer: Checkpointer, step: int,
                     current: dict[str, Any]) -> None:
  """Raises IncompatibleCheckpointError naming every mismatched field."""
  saved = checkpointer.restore_config(step)
  fatal, other = compare_configs(saved, current)
  if fatal:
    raise IncompatibleCheckpointError(
        f"{checkpointer.directory} holds a checkpoint (step {step}) of an "
        "incompatible config:\n  " + "\n  ".join(fatal) +
        "\nUse a new --workdir, or set these fields back to the checkpoint's "
        "values to resume.")
  if other:
    logging.warning("Resuming step %d with config changes: %s", step,
                    "; ".join(other))


# ---------------------------------------------------------------- inference

def list_steps(workdir) -> list[int]:
  """Steps with a complete checkpoint in the workdir, ascending."""
  if not checkpoint_dir(workdir).exists():
    return []
  return Checkpointer(workdir, read_only=True).all_steps()


def resolve_step(workdir, checkpoint: str | int = "latest") -> int:
  """The step of "latest", "best" (by the run's best_metric) or a number."""
  return _resolve_step(_reader(workdir), checkpoint)


def _resolve_step(ckpt: Checkpointer, checkpoint) -> int:
  steps = ckpt.all_steps()
  if not steps:
    raise FileNotFoundError(f"no checkpoint in {ckpt.directory}")
  if checkpoint == "latest":
    return steps[-1]
  if checkpoint == "best":
    best = ckpt.best_step()
    if best is None:
      logging.warning("No checkpoint has %s; using the latest.",
                      ckpt.best_metric)
      return steps[-1]
    return best
  step = int(checkpoint)
  if step not in steps:
    raise FileNotFoundError(f"no checkpoint of step {step} in {ckpt.directory}"
                            f"; steps: {steps}")
  return step


def _reader(workdir) -> Checkpointer:
  ckpt = Checkpointer(workdir, read_only=True)
  # Best-by policy of the run that wrote it, if its config is readable.
  config_file = epath.Path(workdir) / "config.json"
  if config_file.exists():
    config = ml_collections.ConfigDict(json.loads(config_file.read_text()))
    ckpt.best_metric, ckpt.best_mode = best_metric_and_mode(config)
  return ckpt


def restore_params(workdir, steps: Sequence[int],
                   device: jax.Device | None = None) -> list[Any]:
  """Params (only) of several steps, each on one device (for averaging)."""
  ckpt = _reader(workdir)
  device = device or jax.local_devices()[0]
  sharding = jax.sharding.SingleDeviceSharding(device)
  reader = ocp.CheckpointManager(
      ckpt.directory, options=ocp.CheckpointManagerOptions(read_only=True),
      item_names=(STATE,), item_handlers={STATE: ocp.PyTreeCheckpointHandler()})
  out = []
  for step in steps:
    record = ckpt.restore_config(step)
    model_config = TransformerConfig.from_dict(record["model"])
    shapes = jax.eval_shape(lambda rng: init_params(model_config, rng),
                            jax.random.key(0))
    target = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
        shapes)
    restore_args = jax.tree.map(
        lambda s: ocp.ArrayRestoreArgs(sharding=sharding), shapes)
    restored = reader.restore(step, args=ocp.args.Composite(**{
        STATE: ocp.args.PyTreeRestore(
            item={"params": target}, restore_args={"params": restore_args},
            partial_restore=True)}))
    out.append(restored[STATE]["params"])
  return out


def load_for_inference(workdir, checkpoint: str | int = "latest"
                       ) -> tuple[TransformerConfig, Any, ml_collections.ConfigDict]:
  """(model config, params on one device, experiment config) of a checkpoint.

  checkpoint: "latest", "best" (by the run's best_metric; the latest if no
  checkpoint has it) or a step number. Only params are read, not the
  optimizer state. The tokenizer is at ``tokenizer.model_path(workdir)``.
  """
  ckpt = _reader(workdir)
  step = _resolve_step(ckpt, checkpoint)
  record = ckpt.restore_config(step)
  model_config = TransformerConfig.from_dict(record["model"])
  params = restore_params(workdir, [step])[0]
  logging.info("Loaded params of step %d from %s", step, ckpt.directory)
  return model_config, params, ml_collections.ConfigDict(record["experiment"])
