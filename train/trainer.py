"""The training loop: steps, periodic evaluation, checkpoints, metrics.

``train_and_evaluate(config, workdir)`` runs (or resumes) one experiment:

1. tokenizer: trained on the training split, or loaded, at
   ``<workdir>/tokenizer/spm.model``; the model's vocab_size is set from it;
2. the resolved config is written to ``<workdir>/config.json``;
3. if ``<workdir>/checkpoints`` holds a checkpoint, the run resumes from the
   latest one (train state and input-iterator state: exactly the batches an
   uninterrupted run would see), after checking the config is compatible;
4. the loop trains until ``num_train_steps`` or the wall-time budget
   ``max_minutes`` (wall time of this launch, data preparation and compilation
   included; the final evaluation and checkpoint follow it) or SIGTERM
   (checkpoint, then exit 0; multi-host: agreed at log steps), evaluating the validation loss every
   ``eval_every_steps``, BLEU every ``eval_bleu_every_steps`` (when
   ``train/evaluate.py`` provides it), checkpointing every
   ``checkpoint_every_steps`` and at the end, and logging every
   ``log_every_steps`` (console line, TensorBoard, ``metrics.jsonl``).

A NaN or Inf loss stops the run with ``NonFiniteLossError`` naming the step
and the last checkpoint written before it (losses are checked before every
checkpoint, so none is written after a non-finite loss).
"""

from __future__ import annotations

import itertools
import json
import signal
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from model import TransformerConfig
from train import checkpointing, sharding, steps as steps_lib
from train.checkpointing import NonFiniteLossError
from train.metrics import MetricWriter, progress_line

CONFIG_FILE = "config.json"
# Periodic validation BLEU: train/evaluate.py (the decoding issue) provides
#   validation_bleu(model_config, params, batches, eval_data, tokenizer,
#                   config) -> {"bleu": float, "chrf": float, ...}
# decoding `batches` (a list of eval batches of the validation split) and
# scoring against eval_data.references. Until it exists the hook is skipped.
BLEU_HOOK_MODULE = "train.evaluate"
BLEU_HOOK_FUNCTION = "validation_bleu"


# ---------------------------------------------------------------- data

class SyntheticBatches:
  """Deterministic packed batches of a copy task, for tests and benchmarks.

  Same format as the input pipeline: dict of int32 [batch, max_len] arrays
  src, tgt, *_segment_ids (1, 2 per pair, 0 = pad), *_positions. Batch i
  depends only on (seed, i); get_state()/set_state() make it checkpointable.
  """

  def __init__(self, batch_size: int, max_len: int, vocab_size: int,
               seed: int = 0, process_index: int = 0, process_count: int = 1):
    self.batch_size, self.max_len, self.vocab_size = batch_size, max_len, vocab_size
    self.seed, self.index = seed, 0
    self.rows = slice(process_index * batch_size // process_count,
                      (process_index + 1) * batch_size // process_count)

  def get_state(self) -> dict:
    return {"index": self.index}

  def set_state(self, state: dict) -> None:
    self.index = int(state["index"])

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self.seed, self.index])
    self.index += 1
    shape = (self.batch_size, self.max_len)
    out = {k: np.zeros(shape, np.int32) for k in steps_lib.BATCH_KEYS}
    for row in range(self.batch_size):
      start = 0
      for segment in (1, 2):
        length = int(rng.integers(3, max(4, self.max_len // 2)))
        if start + length > self.max_len:
          break
        pair = np.append(rng.integers(2, self.vocab_size, length - 1), 1)
        span = slice(start, start + length)
        for side in ("src", "tgt"):  # a copy task: tgt = src
          out[side][row, span] = pair
          out[f"{side}_segment_ids"][row, span] = segment
          out[f"{side}_positions"][row, span] = np.arange(length)
        start += length
    return {k: v[self.rows] for k, v in out.items()}


class _SyntheticEval:
  def __init__(self, config, vocab_size):  # noqa: D107
    self.config, self.vocab_size = config, vocab_size

  def batches(self):
    return itertools.islice(
        SyntheticBatches(self.config.batch_size, self.config.data.max_len,
                         self.vocab_size, seed=10_000 + self.config.seed,
                         process_index=jax.process_index(),
                         process_count=jax.process_count()), len(self))

  def __len__(self):
    return 2


def make_data(config, workdir):
  """(tokenizer or None, vocab_size, train iterator, eval data)."""
  if config.synthetic_data:
    overrides = {k: v for k, v in config.model.to_dict().items()
                 if v is not None}
    vocab = TransformerConfig.preset(config.model_preset, **overrides).vocab_size
    it = SyntheticBatches(config.batch_size, config.data.max_len, vocab,
                          seed=config.seed, process_index=jax.process_index(),
                          process_count=jax.process_count())
    return None, vocab, it, _SyntheticEval(config, vocab)
  from train import input_pipeline  # pylint: disable=g-import-not-at-top
  tok = input_pipeline.train_or_load_tokenizer(config.data, str(workdir))
  it = input_pipeline.make_train_iterator(config.data, tok, config.batch_size)
  eval_data = input_pipeline.make_eval_data(config.data, tok, config.batch_size)
  return tok, tok.vocab_size, it, eval_data


def model_config_for(config, vocab_size: int) -> TransformerConfig:
  """The preset + overrides, vocab from the tokenizer, max_len >= the data's."""
  overrides = {k: v for k, v in config.model.to_dict().items() if v is not None}
  overrides["vocab_size"] = int(vocab_size)
  base = TransformerConfig.preset(config.model_preset, **overrides)
  if base.max_len < config.data.max_len:
    base = base.replace(max_len=config.data.max_len)
  return base


# ---------------------------------------------------------------- helpers

class _Stop:
  """SIGTERM (preemption) -> finish the step, checkpoint, exit cleanly."""

  def __init__(self):
    self.requested = False
    self.reason = ""
    self._previous = None

  def install(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      self._previous = None

  def uninstall(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def _handle(self, signum, frame):
    del frame
    self.requested = True
    self.reason = f"signal {signal.Signals(signum).name}"


def _save_config(config, model_config, workdir: epath.Path) -> dict:
  record = checkpointing.config_record(config, model_config)
  if sharding.is_main_process():
    path = workdir / CONFIG_FILE
    tmp = workdir / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(record["experiment"], indent=2, sort_keys=True))
    tmp.replace(path)
  return record


def trim_padding(batch: dict[str, np.ndarray], multiple: int = 32
                 ) -> dict[str, np.ndarray]:
  """Drops all-padding trailing columns, keeping a multiple of ``multiple``.

  Eval rows hold one pair each (not packed), mostly padding at max_len; a
  few bucketed widths mean a few compilations and far less work.
  """
  used = max(int(np.max(np.nonzero(batch[k].any(axis=0))[0], initial=0)) + 1
             for k in ("src", "tgt"))
  width = min(batch["src"].shape[1], -(-used // multiple) * multiple)
  return {k: (v[:, :width] if v.ndim == 2 else v) for k, v in batch.items()}


def evaluate_loss(runner, params, eval_data, num_batches: int) -> dict[str, float]:
  """Validation loss / NLL / perplexity / accuracy over the split (or a prefix)."""
  totals = None
  for i, batch in enumerate(eval_data.batches()):
    if 0 <= num_batches <= i:
      break
    if jax.process_count() == 1:  # hosts would disagree on the width
      batch = trim_padding(batch)
    sums = runner.eval_step(params, runner.place_batch(batch))
    totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
    totals = jax.device_get(totals)
  if totals is None:
    return {}
  return {f"eval_{k}": float(v) for k, v in
          steps_lib.normalise(jax.tree.map(np.asarray, totals)).items()}


def _bleu_hook():
  try:
    module = __import__(BLEU_HOOK_MODULE, fromlist=[BLEU_HOOK_FUNCTION])
  except ImportError:
    return None
  return getattr(module, BLEU_HOOK_FUNCTION, None)


def evaluate_bleu(config, runner, model_config, state, eval_data, tokenizer
                  ) -> dict[str, float]:
  """The call site for periodic validation BLEU (see BLEU_HOOK_FUNCTION)."""
  hook = _bleu_hook()
  if hook is None or tokenizer is None:
    logging.log_first_n(logging.WARNING, "Validation BLEU skipped: %s.%s is "
                        "not available yet.", 1, BLEU_HOOK_MODULE,
                        BLEU_HOOK_FUNCTION)
    return {}
  if jax.process_count() > 1:
    # Every host decodes the same rows: the jitted search over the global
    # params takes host-local numpy inputs as replicated, so they must agree
    # across hosts; and the score then covers all rows, not one host's share.
    from train import input_pipeline  # pylint: disable=g-import-not-at-top
    eval_data = input_pipeline.make_eval_data(
        config.data, tokenizer, config.batch_size, process_index=0,
        process_count=1)
  batches = []
  for i, batch in enumerate(eval_data.batches()):
    if 0 <= config.eval_bleu_num_batches <= i:
      break
    batches.append(batch)
  params = state.params
  if isinstance(runner, sharding.PmapRunner):
    params = runner.unreplicate(params)
  try:
    scores = hook(model_config, params, batches, eval_data, tokenizer, config)
  except Exception:  # pylint: disable=broad-except
    # A decoding bug must not end a long run; it is logged loudly instead.
    logging.exception("Validation BLEU failed; training continues.")
    return {}
  return {f"eval_{k}": float(v) for k, v in scores.items()}


# ---------------------------------------------------------------- the loop

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str
                       ) -> dict[str, Any]:
  """Trains (or resumes) the experiment in ``workdir``; returns last metrics."""
  start_time = time.time()
  sharding.maybe_initialize_distributed(config)
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  main = sharding.is_main_process()
  say = (lambda msg: print(msg, flush=True)) if main else (lambda msg: None)

  say(f"Preparing data and tokenizer in {workdir} ...")
  tokenizer, vocab_size, train_iter, eval_data = make_data(config, workdir)
  model_config = model_config_for(config, vocab_size)
  record = _save_config(config, model_config, workdir)
  say(f"Model: {model_config}")

  runner = sharding.make_runner(config, model_config, config.batch_size,
                                config.data.max_len)
  ckpt = checkpointing.Checkpointer(workdir, config)
  rng = jax.random.key(config.seed)
  init_rng, dropout_rng = jax.random.split(rng)

  latest = ckpt.latest_step()
  if latest is not None:
    checkpointing.check_compatible(ckpt, latest, record)
    say(f"Resuming from step {latest} ({ckpt.directory})")
    state = runner.state_from_checkpoint(
        ckpt.restore(latest, runner.abstract_state(), train_iter))
  else:
    say("Initialising a new model")
    state = runner.init_state(init_rng)
  step = int(jax.device_get(runner.state_for_checkpoint(state).step))
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(
      runner.abstract_state().params))
  say(f"{num_params:,} parameters; step {step}; devices: "
      f"{jax.device_count()} ({jax.process_count()} processes), parallelism="
      f"{config.parallelism}")

  writer = MetricWriter(workdir, enabled=main)
  stop = _Stop()
  stop.install()
  budget = config.max_minutes * 60 if config.max_minutes > 0 else float("inf")
  total = config.num_train_steps
  last_good = latest
  pending: list[tuple[int, dict]] = []
  interval = {"start": time.time()}
  last_metrics: dict[str, Any] = {}
  last_eval: dict[str, float] = {}

  def flush_pending() -> dict[str, float]:
    """Fetch the device metrics of the steps since the last flush."""
    nonlocal pending
    if not pending:
      return {}
    fetched = jax.device_get([m for _, m in pending])
    for (s, _), m in zip(pending, fetched):
      # The loss is computed before the update: a finite loss with a
      # non-finite gradient still leaves NaN params, so check both.
      if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):
        ckpt.wait()
        raise NonFiniteLossError(
            f"the training loss is {float(m['loss'])} at step {s} "
            f"(grad norm {float(m['grad_norm'])}). Last good checkpoint: "
            + (f"step {last_good} in {ckpt.directory}" if last_good is not None
               else "none") +
            ". Lower optimizer.learning_rate_scale, set optimizer.grad_clip_norm"
            ", or check the data, then resume from it (rerun with the same "
            "workdir) or start a new workdir.")
    tokens = sum(float(m["num_tokens"]) for m in fetched)
    elapsed = max(time.time() - interval["start"], 1e-9)
    n = len(fetched)
    last = fetched[-1]
    out = {f"train_{k}": float(np.mean([m[k] for m in fetched]))
           for k in ("loss", "nll", "accuracy", "grad_norm")}
    out["train_perplexity"] = float(np.exp(min(out["train_nll"], 50.0)))
    out["learning_rate"] = float(last["learning_rate"])
    out["steps_per_sec"] = n / elapsed
    out["target_tokens_per_sec"] = tokens / elapsed
    pending = []
    interval["start"] = time.time()
    return out

  def log():
    scalars = flush_pending()
    if scalars:
      last_metrics.update(scalars)
      writer.write(step, scalars)
      say(progress_line(step, total, scalars, eta(scalars)))

  def eta(scalars):
    rate = scalars.get("steps_per_sec", 0.0)
    by_steps = (total - step) / rate if rate > 0 else float("inf")
    by_time = budget - (time.time() - start_time)
    return max(0.0, min(by_steps, by_time))

  def save(metrics=None):
    nonlocal last_good
    ckpt.save(step, runner.state_for_checkpoint(state), train_iter,
              record, metrics=metrics, force=True)
    last_good = step

  say(f"Training to step {total}" + (f" or for {config.max_minutes:g} min"
                                      if budget < float("inf") else "")
      + " (the first step compiles; it can take a while)")
  try:
    while step < total:
      batch = next(train_iter)
      state, metrics = runner.train_step(state, runner.place_batch(batch),
                                         dropout_rng)
      step += 1
      pending.append((step, metrics))
      if len(pending) >= 2:
        # At most two steps in flight: JAX would otherwise dispatch up to a
        # whole log interval ahead, and a SIGTERM (preemption) would wait for
        # all of them before the save.
        jax.block_until_ready(pending[-2][1])
      out_of_time = time.time() - start_time >= budget
      want_stop = stop.requested or out_of_time
      if jax.process_count() > 1:  # every process must stop at the same step
        want_stop = (_any_process(want_stop)
                     if step % config.log_every_steps == 0 else False)
      finishing = step >= total or want_stop
      if step == 1 or step % config.log_every_steps == 0 or finishing:
        log()
        ckpt.check_for_errors()
      # On SIGTERM save first and fast; skip the final evaluation.
      evaluate_now = (step % config.eval_every_steps == 0 or
                      (finishing and not stop.requested))
      if evaluate_now:
        log()
        eval_metrics = evaluate_loss(runner, state.params, eval_data,
                                     config.num_eval_batches)
        if config.eval_bleu_every_steps > 0 and (
            step % config.eval_bleu_every_steps == 0 or finishing):
          eval_metrics.update(evaluate_bleu(config, runner, model_config,
                                            state, eval_data, tokenizer))
        last_eval = eval_metrics
        last_metrics.update(eval_metrics)
        writer.write(step, eval_metrics)
        say(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in
                                         sorted(eval_metrics.items())))
      if step % config.checkpoint_every_steps == 0 or finishing:
        log()  # checks the loss: never checkpoint a state after a NaN
        save(last_eval if evaluate_now else None)
      if finishing:
        if stop.requested:
          say(f"Stopping at step {step} on {stop.reason or 'a stop request'};"
              " checkpoint saved")
        elif step < total:
          say(f"Stopping at step {step}: wall-time budget of "
              f"{config.max_minutes:g} min used")
        break
  finally:
    stop.uninstall()
    ckpt.wait()
    ckpt.close()
    writer.close()
  last_metrics["step"] = step
  say(f"Done at step {step} after {(time.time() - start_time) / 60:.1f} min; "
      f"checkpoints in {ckpt.directory}")
  return last_metrics


def _any_process(flag: bool) -> bool:
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  flags = multihost_utils.process_allgather(np.asarray(flag, np.int32))
  return bool(np.any(flags))
