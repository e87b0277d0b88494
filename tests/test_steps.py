"""train/steps.py: schedule, label-smoothed loss, step determinism, accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import base_config, tiny
from model import TransformerConfig
from train import steps
from train.batches import SyntheticBatches


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


def test_decaying_schedules_by_hand():
  # d_model 256, warm-up 100, scale 0.5, decay to 10% of the peak at s = 1100.
  d_model, warmup, scale, decay, final = 256, 100, 0.5, 1100, 0.1
  peak = 0.5 * 256**-0.5 * 100**-0.5                     # 0.003125
  assert peak == pytest.approx(0.003125)
  cosine = steps.learning_rate_schedule(d_model, warmup, scale, "cosine",
                                        decay, final)
  linear = steps.learning_rate_schedule(d_model, warmup, scale, "linear",
                                        decay, final)
  end = final * peak                                       # 0.0003125
  # s = count + 1. Warm-up: s / warmup * peak; s = 50 -> 0.0015625.
  for schedule in (cosine, linear):
    np.testing.assert_allclose(float(schedule(49)), 0.0015625, rtol=1e-5)
    np.testing.assert_allclose(float(schedule(99)), 0.003125, rtol=1e-5)
    np.testing.assert_allclose(float(schedule(1099)), end, rtol=1e-5)
    np.testing.assert_allclose(float(schedule(5000)), end, rtol=1e-5)
  # Half-way through the decay (s = 600): cosine and linear both give the
  # mid-point (end + peak) / 2 = 0.00171875; a quarter in (s = 350): cosine
  # end + (peak - end) * (1 + cos(pi / 4)) / 2 = 0.00271311891..., linear
  # peak - (peak - end) / 4 = 0.002421875.
  np.testing.assert_allclose(float(cosine(599)), 0.00171875, rtol=1e-5)
  np.testing.assert_allclose(float(linear(599)), 0.00171875, rtol=1e-5)
  np.testing.assert_allclose(float(cosine(349)), 0.0027131189, rtol=1e-5)
  np.testing.assert_allclose(float(linear(349)), 0.002421875, rtol=1e-5)


def test_wsd_schedule_by_hand():
  # d_model 256, warm-up 100, scale 0.5: peak 0.003125. Decay to 0 at
  # s = 1100 over its last 20%: the peak is held from s = 100 to s = 880.
  wsd = steps.learning_rate_schedule(256, 100, 0.5, "wsd", 1100, 0.0, 0.2)
  np.testing.assert_allclose(float(wsd(49)), 0.0015625, rtol=1e-5)  # s = 50
  for s in (100, 500, 880):
    np.testing.assert_allclose(float(wsd(s - 1)), 0.003125, rtol=1e-5)
  # s = 990: half-way down the 220 decaying steps; s = 1045: a quarter left.
  np.testing.assert_allclose(float(wsd(989)), 0.0015625, rtol=1e-5)
  np.testing.assert_allclose(float(wsd(1044)), 0.00078125, rtol=1e-5)
  assert float(wsd(1099)) == pytest.approx(0.0, abs=1e-12)
  assert float(wsd(3000)) == pytest.approx(0.0, abs=1e-12)
  with pytest.raises(ValueError, match="inside the warm-up of 100 steps"):
    steps.learning_rate_schedule(256, 100, 0.5, "wsd", 1100, 0.0, 0.95)
  with pytest.raises(ValueError, match="wsd_decay_fraction=0.0"):
    steps.learning_rate_schedule(256, 100, 0.5, "wsd", 1100, 0.0, 0.0)


def test_decaying_schedule_needs_its_length():
  with pytest.raises(ValueError, match="decay_steps=0"):
    steps.learning_rate_schedule(256, 100, 1.0, "cosine", 0)
  with pytest.raises(ValueError, match="schedule='noam'"):
    steps.learning_rate_schedule(256, 100, 1.0, "noam", 1000)


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
  parts = steps.build(model_config, config.optimizer, config.label_smoothing)
  data = SyntheticBatches(4, 16, model_config.vocab_size, seed=1)
  state = parts["create_state"](jax.random.key(0))
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


def numpy_adam(grads, lrs, b1=0.9, b2=0.98, eps=1e-9, clip=0.0):
  """The paper's Adam (Kingma & Ba, bias-corrected), optional global clipping."""
  m = v = np.zeros_like(grads[0])
  updates = []
  for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
    norm = np.sqrt(np.sum(g * g))
    if clip and norm > clip:
      g = g * clip / norm
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
    updates.append(-lr * m_hat / (np.sqrt(v_hat) + eps))
  return updates


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_optimizer_is_the_papers_adam_with_optional_clipping(clip):
  opt = base_config().optimizer   # the paper's Adam(0.9, 0.98, 1e-9), rsqrt
  opt.update(dict(warmup_steps=10, grad_clip_norm=clip))
  tx, schedule = steps.make_optimizer(opt, d_model=16)
  rng = np.random.default_rng(0)
  # Gradients of changing direction and size, so b2 = 0.98 and the clipping
  # both shape the later updates.
  grads = [rng.normal(size=4) * scale for scale in (3.0, 0.1, 1.0)]
  params = {"w": jnp.zeros(4)}
  state, got = tx.init(params), []
  for g in grads:
    updates, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, params)
    got.append(np.asarray(updates["w"]))
  lrs = [float(schedule(i)) for i in range(3)]
  expected = numpy_adam(grads, lrs, clip=clip)
  np.testing.assert_allclose(np.stack(got), np.stack(expected), rtol=1e-4)
  if clip:  # clipping changes the result: not a no-op
    unclipped = numpy_adam(grads, lrs)
    assert np.abs(np.stack(unclipped) - np.stack(expected)).max() > 1e-4 * lrs[1]




# ---------------------------------------------------------------- moving average

def test_ema_update_by_hand():
  ema = {"w": jnp.array([1.0, 2.0])}
  params = {"w": jnp.array([3.0, -2.0])}
  # Update 0: d = min(0.9, 1/10) = 0.1 -> 0.1 * ema + 0.9 * params.
  np.testing.assert_allclose(steps.ema_update(ema, params, 0, 0.9)["w"],
                             [2.8, -1.6], rtol=1e-6)
  # Update 8: d = min(0.99, 9/18) = 0.5.
  np.testing.assert_allclose(steps.ema_update(ema, params, 8, 0.99)["w"],
                             [2.0, 0.0], atol=1e-6)
  # Update 90: (91/100) > 0.9, so d = 0.9.
  np.testing.assert_allclose(steps.ema_update(ema, params, 90, 0.9)["w"],
                             [1.2, 1.6], rtol=1e-6)


@pytest.mark.parametrize("accum", [1, 2])
def test_ema_follows_the_params_and_leaves_training_alone(accum):
  parts, data, state = _small_setup(ema_decay=0.6, grad_accum_steps=accum)
  plain_parts, _, plain = _small_setup(grad_accum_steps=accum)
  assert plain.ema_params is None
  jax.tree.map(np.testing.assert_array_equal, state.ema_params, state.params)
  step, plain_step = jax.jit(parts["train_step"]), jax.jit(
      plain_parts["train_step"])
  rng = jax.random.key(3)
  leaf = lambda tree: np.asarray(tree["decoder"]["layers_0"]["ffn"]["wi"]
                                 ["kernel"], np.float64)
  expected = leaf(state.params)
  for i in range(6):
    batch = {k: jnp.asarray(v) for k, v in next(data).items()}
    state, _ = step(state, batch, rng)
    plain, _ = plain_step(plain, batch, rng)
    jax.tree.map(np.testing.assert_array_equal, state.params, plain.params)
    if (i + 1) % accum == 0:   # an optimizer update: n = i // accum
      n = i // accum
      d = min(0.6, (1 + n) / (10 + n))
      expected = d * expected + (1 - d) * leaf(state.params)
    np.testing.assert_allclose(leaf(state.ema_params), expected, rtol=1e-5,
                               atol=1e-7)
  assert not np.allclose(leaf(state.ema_params), leaf(state.params))


def test_ema_decay_out_of_range_names_the_field():
  with pytest.raises(ValueError, match="ema_decay=1.0"):
    _small_setup(ema_decay=1.0)
