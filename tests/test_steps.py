"""train/steps.py: schedule, label-smoothed loss, step determinism, accumulation."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments.configs import tiny
from model import TransformerConfig
from train import steps, trainer


@pytest.mark.parametrize("d_model,warmup,scale", [(512, 4000, 1.0),
                                                  (256, 800, 2.0)])
def test_schedule_matches_paper_formula(d_model, warmup, scale):
  schedule = steps.learning_rate_schedule(d_model, warmup, scale)
  for step in (1, 2, 10, 100, warmup - 1, warmup, warmup + 1, 3 * warmup,
               100_000):
    expected = scale * d_model**-0.5 * min(step**-0.5, step * warmup**-1.5)
    got = float(schedule(step - 1))  # Optax counts updates from 0
    np.testing.assert_allclose(got, expected, rtol=1e-6, err_msg=str(step))
  # The peak is at the end of warm-up.
  peak = float(schedule(warmup - 1))
  assert peak > float(schedule(warmup - 10)) and peak > float(schedule(warmup + 10))


def _numpy_losses(logits, targets, eps):
  vocab = logits.shape[-1]
  shifted = logits - logits.max(-1, keepdims=True)
  log_p = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  one_hot = np.eye(vocab)[targets]
  q = (1 - eps) * one_hot + eps / vocab
  weights = (targets != 0).astype(np.float64)
  smoothed = -(q * log_p).sum(-1)
  nll = -(one_hot * log_p).sum(-1)
  correct = (logits.argmax(-1) == targets)
  n = weights.sum()
  return {"loss": (smoothed * weights).sum() / n,
          "nll": (nll * weights).sum() / n,
          "accuracy": (correct * weights).sum() / n, "num_tokens": n}


def test_label_smoothed_loss_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7)) * 3
  targets = np.array([[3, 4, 1, 0, 0], [2, 6, 5, 5, 1]])  # 0 = pad
  for eps in (0.0, 0.1, 0.3):
    got = steps.normalise(steps.loss_sums(jnp.asarray(logits, jnp.float32),
                                          jnp.asarray(targets), eps))
    want = _numpy_losses(logits, targets, eps)
    for key, value in want.items():
      np.testing.assert_allclose(float(got[key]), value, rtol=1e-5,
                                 err_msg=f"{key} eps={eps}")
    np.testing.assert_allclose(float(got["perplexity"]), np.exp(want["nll"]),
                               rtol=1e-5)
  # Pad positions do not count, whatever their logits.
  other = logits.copy()
  other[0, 3:] = 100.0
  a = steps.normalise(steps.loss_sums(jnp.asarray(logits, jnp.float32),
                                      jnp.asarray(targets), 0.1))
  b = steps.normalise(steps.loss_sums(jnp.asarray(other, jnp.float32),
                                      jnp.asarray(targets), 0.1))
  np.testing.assert_allclose(float(a["loss"]), float(b["loss"]), rtol=1e-6)


def test_label_smoothing_floor_is_the_minimum():
  vocab, eps = 11, 0.1
  targets = np.array([[3, 5, 1]])
  q = (1 - eps) * np.eye(vocab)[targets] + eps / vocab
  best = steps.normalise(steps.loss_sums(jnp.log(jnp.asarray(q, jnp.float32)),
                                         jnp.asarray(targets), eps))
  np.testing.assert_allclose(float(best["loss"]),
                             steps.label_smoothing_floor(vocab, eps), rtol=1e-5)
  assert steps.label_smoothing_floor(vocab, 0.0) == 0.0


def _small_setup(**optimizer):
  config = tiny.get_config()
  config.optimizer.update(optimizer)
  model_config = TransformerConfig.preset(
      "tiny", num_encoder_layers=1, num_decoder_layers=1)
  parts = steps.build(config, model_config)
  data = trainer.SyntheticBatches(4, 16, model_config.vocab_size, seed=1)
  state = steps.create_train_state(parts["model"], parts["tx"],
                                   jax.random.key(0), steps.example_batch(1, 8))
  return parts, data, state


def test_step_is_deterministic_and_dropout_follows_the_step():
  parts, data, state = _small_setup(grad_accum_steps=2)
  step = jax.jit(parts["train_step"])
  batch = {k: jnp.asarray(v) for k, v in next(data).items()}
  rng = jax.random.key(7)
  s1, m1 = step(state, batch, rng)
  s1b, m1b = step(state, batch, rng)
  assert float(m1["loss"]) == float(m1b["loss"])
  jax.tree.map(np.testing.assert_array_equal, s1.params, s1b.params)
  # Same batch, same rng, a later step: other dropout masks, another loss.
  later = state.replace(step=state.step + 2)
  _, m_later = step(later, batch, rng)
  assert float(m_later["loss"]) != float(m1["loss"])
  # Gradient accumulation (MultiSteps, k=2): params move only every 2nd call.
  jax.tree.map(np.testing.assert_array_equal, s1.params, state.params)
  s2, _ = step(s1, batch, rng)
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()),
                       s2.params, state.params)
  assert max(jax.tree.leaves(moved)) > 0
  assert int(s2.step) == 2
  # lr is reported per optimizer update: micro-steps 0 and 1 share lr(1).
  assert float(m1["learning_rate"]) == pytest.approx(
      float(parts["schedule"](0)))


def test_optimizer_has_paper_adam_and_optional_clipping():
  opt = ml_collections.ConfigDict(dict(
      learning_rate_scale=1.0, warmup_steps=10, adam_b1=0.9, adam_b2=0.98,
      adam_eps=1e-9, grad_clip_norm=1e-3, grad_accum_steps=1, weight_decay=0.0))
  tx, schedule = steps.make_optimizer(opt, d_model=16)
  params = {"w": jnp.ones(3)}
  grads = {"w": jnp.array([1e3, 0.0, 0.0])}
  updates, _ = tx.update(grads, tx.init(params), params)
  # Adam's first update is lr * g / (|g| + eps) (bias-corrected): with or
  # without clipping its size is lr for the nonzero coordinate.
  np.testing.assert_allclose(float(updates["w"][0]), -float(schedule(0)),
                             rtol=1e-4)
  assert float(updates["w"][1]) == 0.0
