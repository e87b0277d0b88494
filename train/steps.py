"""train_step / eval_step: pure functions of (state, batch, rng).

Everything here is placement-agnostic: the same ``train_step`` runs on one
device, under ``jax.jit`` over a sharded mesh, or under ``jax.pmap`` (see
``train/sharding.py``, which passes ``axis_name`` for the pmap case).

Loss (section 5.4, "Label Smoothing"): cross-entropy between the model's
softmax and the smoothed target distribution

    q = (1 - eps) * one_hot(y) + eps / V       (``optax.smooth_labels``)

summed over non-pad target tokens (weights = ``tgt != 0``) and divided by
their count. Its minimum is not 0 but the entropy of q,

    H(q) = -(1 - eps + eps/V) log(1 - eps + eps/V) - (V - 1) (eps/V) log(eps/V),

a constant offset (``label_smoothing_floor``; about 1.5 nats for eps=0.1,
V=8000). The reported ``loss`` includes it (it is what is optimised); ``nll``
is the plain cross-entropy against one_hot(y), ``perplexity = exp(nll)``.

Optimiser (section 5.3): Adam(beta1=0.9, beta2=0.98, eps=1e-9) with

    lr(step) = scale * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)

with ``step`` counted from 1 (optimizer updates, not micro-batches).

Parameter averaging (a departure, ``optimizer.ema_decay`` > 0): the state
also carries an exponential moving average of the params, updated after each
optimizer update n = 0, 1, ... (``ema_update``) with

    ema <- d_n * ema + (1 - d_n) * params,   d_n = min(ema_decay, (1 + n) / (10 + n))

starting from the initial params; d_n's ramp (TensorFlow's
ExponentialMovingAverage with num_updates) keeps the random initialisation
from weighing on the average early in a short run.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from model import PAD_ID, Transformer, TransformerConfig, layers
from train.batches import example_batch

Batch = dict[str, jax.Array]  # the layout of train/batches.py


class TrainState(flax.struct.PyTreeNode):
  """What a training run carries from step to step (and checkpoints).

  step: int32 scalar, number of train_step calls done (micro-batches).
  params: the model's params tree (float32), names in model/transformer.py.
  opt_state: the Optax state (Adam moments, counts, accumulators).
  ema_params: the moving average of params (their tree), or None when
    optimizer.ema_decay is 0.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any = None


# ---------------------------------------------------------------- schedule

SCHEDULES = ("rsqrt", "cosine", "linear", "wsd")


def learning_rate_schedule(d_model: int, warmup_steps: int = 4000,
                           scale: float = 1.0, kind: str = "rsqrt",
                           decay_steps: int = 0,
                           final_fraction: float = 0.0,
                           wsd_decay_fraction: float = 0.2) -> optax.Schedule:
  """The learning rate at each update; s = update count + 1 (lr(1) first).

  rsqrt: section 5.3, eq. (3): scale * d_model^-0.5 * min(s^-0.5,
    s * warmup^-1.5). It never anneals.
  cosine, linear (departures, for a run of known length): a linear warm-up to
    eq. (3)'s peak, scale * d_model^-0.5 * warmup^-0.5, at s = warmup_steps,
    then a cosine or linear decay to final_fraction * peak at s =
    decay_steps (and flat after).
  wsd (warm-up, stable, decay; Hu et al. 2024, Hägele et al. 2024): the same
    warm-up, the peak held, then a linear decay to final_fraction * peak
    over the last wsd_decay_fraction of the run's decay_steps: from s =
    decay_steps - round(wsd_decay_fraction * decay_steps) (at least one
    step before it) to decay_steps.
  """
  if kind == "rsqrt":
    def rsqrt(count):
      s = jnp.asarray(count, jnp.float32) + 1.0
      return (scale * d_model**-0.5 *
              jnp.minimum(s**-0.5, s * float(warmup_steps)**-1.5))
    return rsqrt
  if kind not in SCHEDULES:
    raise ValueError(f"config.optimizer.schedule={kind!r}; choose one of "
                     f"{SCHEDULES}")
  if decay_steps <= warmup_steps:
    raise ValueError(
        f"config.optimizer.decay_steps={decay_steps}: the {kind} schedule "
        f"decays until that step, which must come after warmup_steps="
        f"{warmup_steps}; set it to the run's num_train_steps")
  peak = scale * d_model**-0.5 * warmup_steps**-0.5
  end = final_fraction * peak
  if kind == "cosine":
    decay = optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps,
                                               decay_steps, end)
  elif kind == "wsd":
    if not 0.0 < wsd_decay_fraction <= 1.0:
      raise ValueError(f"config.optimizer.wsd_decay_fraction="
                       f"{wsd_decay_fraction}: choose a share in (0, 1]")
    start = decay_steps - max(1, round(wsd_decay_fraction * decay_steps))
    if start < warmup_steps:
      raise ValueError(
          f"config.optimizer.wsd_decay_fraction={wsd_decay_fraction}: the "
          f"decay would start at step {start}, inside the warm-up of "
          f"{warmup_steps} steps; lower it or train for more steps")
    decay = optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup_steps),
         optax.constant_schedule(peak),
         optax.linear_schedule(peak, end, decay_steps - start)],
        [warmup_steps, start])
  else:
    decay = optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup_steps),
         optax.linear_schedule(peak, end, decay_steps - warmup_steps)],
        [warmup_steps])
  return lambda count: decay(jnp.asarray(count) + 1)


def schedule_of(opt_config, d_model: int) -> optax.Schedule:
  """``learning_rate_schedule`` of config.optimizer's fields; ValueError
  naming the field when they describe no schedule (d_model only scales it,
  so any value checks them)."""
  return learning_rate_schedule(
      d_model, opt_config.warmup_steps, opt_config.learning_rate_scale,
      opt_config.schedule, opt_config.decay_steps,
      opt_config.final_lr_fraction, opt_config.wsd_decay_fraction)


def make_optimizer(opt_config, d_model: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Adam + the paper's schedule, optional clipping and accumulation.

  opt_config fields: learning_rate_scale, warmup_steps, schedule,
  decay_steps, final_lr_fraction, wsd_decay_fraction (see
  ``learning_rate_schedule``), adam_b1,
  adam_b2, adam_eps, grad_clip_norm (0 = off), grad_accum_steps (1 = off),
  weight_decay (0 = off, AdamW; a departure from the paper).
  """
  schedule = schedule_of(opt_config, d_model)
  parts = []
  if opt_config.grad_clip_norm and opt_config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(opt_config.grad_clip_norm))
  if opt_config.weight_decay > 0:
    parts.append(optax.adamw(schedule, b1=opt_config.adam_b1,
                             b2=opt_config.adam_b2, eps=opt_config.adam_eps,
                             weight_decay=opt_config.weight_decay))
  else:
    parts.append(optax.adam(schedule, b1=opt_config.adam_b1,
                            b2=opt_config.adam_b2, eps=opt_config.adam_eps))
  tx = optax.chain(*parts)
  if opt_config.grad_accum_steps > 1:
    # Each train_step is one micro-batch; the update happens every k steps.
    tx = optax.MultiSteps(tx, every_k_schedule=opt_config.grad_accum_steps)
  return tx, schedule


def ema_decay_of(opt_config) -> float:
  """config.optimizer.ema_decay (0 = off); ValueError naming the field if it
  is not in [0, 1)."""
  ema_decay = float(opt_config.get("ema_decay", 0.0))
  if not 0.0 <= ema_decay < 1.0:
    raise ValueError(f"config.optimizer.ema_decay={ema_decay}: choose a decay "
                     "in [0, 1) (0 = no moving average; 0.99 to 0.9999 are "
                     "usual)")
  return ema_decay


def ema_update(ema_params, params, num_updates, ema_decay: float):
  """The moving average after optimizer update ``num_updates`` (0 first).

  d = min(ema_decay, (1 + n) / (10 + n)); returns d * ema + (1 - d) * params.
  """
  n = jnp.asarray(num_updates, jnp.float32)
  decay = jnp.minimum(ema_decay, (1.0 + n) / (10.0 + n))
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p,
                      ema_params, params)


# ---------------------------------------------------------------- loss

def label_smoothing_floor(vocab_size: int, label_smoothing: float) -> float:
  """H(q): the smallest value the smoothed cross-entropy can take, per token."""
  if label_smoothing <= 0:
    return 0.0
  high = 1.0 - label_smoothing + label_smoothing / vocab_size
  low = label_smoothing / vocab_size
  return float(-(high * np.log(high) + (vocab_size - 1) * low * np.log(low)))


def loss_sums(logits, targets, label_smoothing: float) -> dict[str, jax.Array]:
  """Sums over non-pad tokens (not yet normalised).

  logits: float32 [batch, length, vocab]; targets: int [batch, length].
  Returns loss_sum (smoothed CE), nll_sum, correct, num_tokens (float32).
  """
  weights = (targets != PAD_ID).astype(jnp.float32)
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  # One logsumexp instead of log_softmax + one-hot products (measured 2.1x
  # faster on [64, 128, 8000] logits on a CPU, same values). With smoothed
  # targets q = (1 - eps) one_hot + eps / V (optax.smooth_labels):
  #   -sum_v q_v log p_v = lse - (1 - eps) z_target - eps / V * sum_v z_v.
  lse = jax.nn.logsumexp(logits, axis=-1)
  is_target = jnp.arange(vocab, dtype=targets.dtype) == targets[..., None]
  target_logit = jnp.sum(jnp.where(is_target, logits, 0.0), axis=-1)
  nll = lse - target_logit
  if label_smoothing > 0:
    loss = (lse - (1.0 - label_smoothing) * target_logit
            - label_smoothing / vocab * jnp.sum(logits, axis=-1))
  else:
    loss = nll
  correct = (layers.argmax(logits) == targets).astype(jnp.float32)
  return {
      "loss_sum": jnp.sum(loss * weights),
      "nll_sum": jnp.sum(nll * weights),
      "correct": jnp.sum(correct * weights),
      "num_tokens": jnp.sum(weights),
  }


def normalise(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """loss, nll, perplexity, accuracy per non-pad token, from ``loss_sums``."""
  n = jnp.maximum(sums["num_tokens"], 1.0)
  nll = sums["nll_sum"] / n
  return {"loss": sums["loss_sum"] / n, "nll": nll,
          "perplexity": jnp.exp(jnp.minimum(nll, 50.0)),
          "accuracy": sums["correct"] / n, "num_tokens": sums["num_tokens"]}


# ---------------------------------------------------------------- steps

def _apply(model: Transformer, params, batch: Batch, deterministic: bool,
           dropout_rng=None):
  rngs = None if deterministic else {"dropout": dropout_rng}
  return model.apply(
      {"params": params}, batch["src"], batch["tgt"],
      src_segment_ids=batch.get("src_segment_ids"),
      tgt_segment_ids=batch.get("tgt_segment_ids"),
      src_positions=batch.get("src_positions"),
      tgt_positions=batch.get("tgt_positions"),
      deterministic=deterministic, rngs=rngs)


def train_step(state: TrainState, batch: Batch, rng: jax.Array, *,
               model: Transformer, tx: optax.GradientTransformation,
               schedule: optax.Schedule, label_smoothing: float = 0.1,
               grad_accum_steps: int = 1, axis_name: str | None = None,
               ema_decay: float = 0.0
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimiser step (or micro-step) on ``batch``; returns (state, metrics).

  rng: the run's base dropout key; the step's key is fold_in(rng, step), so
  a resumed run draws exactly the masks an uninterrupted run would.
  axis_name: set under pmap; each device's loss is its token sum divided by
  the *global* token count, so the psum of gradients is the gradient of the
  global mean loss: the same numbers as one device holding the whole batch.
  """
  dropout_rng = jax.random.fold_in(rng, state.step)
  if axis_name is not None:
    dropout_rng = jax.random.fold_in(dropout_rng, jax.lax.axis_index(axis_name))
  num_tokens = jnp.sum((batch["tgt"] != PAD_ID).astype(jnp.float32))
  if axis_name is not None:
    num_tokens = jax.lax.psum(num_tokens, axis_name)
  num_tokens = jnp.maximum(num_tokens, 1.0)

  def loss_fn(params):
    logits = _apply(model, params, batch, False, dropout_rng)
    sums = loss_sums(logits, batch["tgt"], label_smoothing)
    return sums["loss_sum"] / num_tokens, sums

  grads, sums = jax.grad(loss_fn, has_aux=True)(state.params)
  if axis_name is not None:
    grads = jax.lax.psum(grads, axis_name)
    sums = jax.lax.psum(sums, axis_name)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = normalise(sums)
  metrics["grad_norm"] = optax.tree.norm(grads)
  metrics["learning_rate"] = schedule(state.step // grad_accum_steps)
  new_state = state.replace(step=state.step + 1, params=params,
                            opt_state=opt_state)
  if ema_decay > 0:
    ema = ema_update(state.ema_params, params, state.step // grad_accum_steps,
                     ema_decay)
    if grad_accum_steps > 1:
      # The params change on every k-th micro-step only.
      updated = (state.step + 1) % grad_accum_steps == 0
      ema = jax.tree.map(lambda new, old: jnp.where(updated, new, old), ema,
                         state.ema_params)
    new_state = new_state.replace(ema_params=ema)
  return new_state, metrics


def eval_step(params, batch: Batch, *, model: Transformer,
              label_smoothing: float = 0.1, axis_name: str | None = None
              ) -> dict[str, jax.Array]:
  """Sums (loss_sum, nll_sum, correct, num_tokens) on ``batch``, no dropout.

  Add the sums of all batches, then ``normalise`` them.
  """
  logits = _apply(model, params, batch, True)
  sums = loss_sums(logits, batch["tgt"], label_smoothing)
  if axis_name is not None:
    sums = jax.lax.psum(sums, axis_name)
  return sums


# ---------------------------------------------------------------- building

def create_train_state(model: Transformer, tx: optax.GradientTransformation,
                       rng: jax.Array, boxed: bool = False,
                       ema: bool = False) -> TrainState:
  """Fresh state. boxed=True keeps the logical-axis boxes (for eval_shape);
  ema: the moving average starts as a copy of the initial params."""
  shapes = example_batch()
  variables = model.init(rng, shapes["src"], shapes["tgt"])
  params = variables["params"]
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                     opt_state=tx.init(params),
                     ema_params=jax.tree.map(jnp.copy, params) if ema
                     else None)
  return state if boxed else nn.unbox(state)


def build(model_config: TransformerConfig, opt_config, label_smoothing: float
          ) -> dict[str, Any]:
  """The model, optimiser and the two step functions bound to them.

  opt_config: ``config.optimizer`` (see ``make_optimizer``).
  """
  model = Transformer(model_config)
  tx, schedule = make_optimizer(opt_config, model_config.d_model)
  accum = max(1, int(opt_config.grad_accum_steps))
  ema_decay = ema_decay_of(opt_config)
  step = functools.partial(train_step, model=model, tx=tx, schedule=schedule,
                           label_smoothing=label_smoothing,
                           grad_accum_steps=accum, ema_decay=ema_decay)
  evaluate = functools.partial(eval_step, model=model,
                               label_smoothing=label_smoothing)
  create_state = functools.partial(create_train_state, model, tx,
                                   ema=ema_decay > 0)
  return {"model": model, "tx": tx, "schedule": schedule,
          "train_step": step, "eval_step": evaluate,
          "create_state": create_state}
