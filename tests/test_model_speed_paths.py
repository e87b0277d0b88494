"""The speed paths of the model against its default float32 path."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from model import (Transformer, TransformerConfig, attention_weights,
                   init_cache, init_params)
from model import layers

TINY = TransformerConfig.preset("tiny")
TINY_BF16 = TINY.replace(dtype="bfloat16")


def _tokens(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).integers(
      2, TINY.vocab_size, size=shape), jnp.int32)


def _shapes(tree):
  return jax.tree.map(lambda x: (x.shape, str(x.dtype)), tree)


def test_bf16_keeps_params_tree_and_cache_layout():
  f32 = init_params(TINY, jax.random.key(0))
  bf16 = init_params(TINY_BF16, jax.random.key(0))
  assert _shapes(f32) == _shapes(bf16)  # float32 params either way
  encoded = jnp.zeros((2, 5, TINY.d_model))
  cache = lambda cfg: jax.tree.map(
      lambda x: x.shape, init_cache(cfg, f32, encoded.astype(cfg.compute_dtype), 6))
  assert cache(TINY) == cache(TINY_BF16)


def test_bf16_logits_close_to_float32_and_float32_out():
  params = init_params(TINY, jax.random.key(0))
  src, tgt = _tokens(0, (3, 12)), _tokens(1, (3, 10))
  f32 = Transformer(TINY).apply({"params": params}, src, tgt)
  bf16 = Transformer(TINY_BF16).apply({"params": params}, src, tgt)
  assert bf16.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(bf16), np.asarray(f32), atol=0.05)
  # Same predictions almost everywhere.
  agree = np.mean(np.argmax(bf16, -1) == np.argmax(f32, -1))
  assert agree > 0.95


def test_bf16_matmuls_accumulate_in_float32():
  params = init_params(TINY, jax.random.key(0))
  src, tgt = _tokens(0, (2, 8)), _tokens(1, (2, 8))
  jaxpr = jax.make_jaxpr(lambda p: Transformer(TINY_BF16).apply(
      {"params": p}, src, tgt))(params)
  dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
  assert dots, "no matmuls found"
  for e in dots:
    assert all(v.aval.dtype == jnp.bfloat16 for v in e.invars), e
    assert e.outvars[0].aval.dtype == jnp.float32, e


def test_attention_kernel_in_float32_equals_flax_default():
  q, k, v = (jax.random.normal(jax.random.key(i), (2, 5, 4, 8)) for i in range(3))
  mask = nn.make_attention_mask(jnp.ones((2, 5)), jnp.arange(5)[None] < 3)
  mask = jnp.broadcast_to(mask, (2, 1, 5, 5))
  ours = layers.dot_product_attention(q, k, v, mask=mask, dtype=jnp.float32)
  flax_default = nn.dot_product_attention(q, k, v, mask=mask)
  np.testing.assert_allclose(ours, flax_default, atol=1e-6)
  # The decoding caches' heads-major layout: the same numbers.
  heads_major = layers.dot_product_attention(
      q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), mask=mask,
      dtype=jnp.float32, kv_heads_major=True)
  np.testing.assert_allclose(heads_major, flax_default, atol=1e-6)


def test_bf16_attention_weights_are_distributions():
  params = init_params(TINY, jax.random.key(0))
  src, tgt = _tokens(0, (2, 7)), _tokens(1, (2, 6))
  maps = attention_weights(TINY_BF16, params, src, tgt)
  for kind in ("encoder_self", "decoder_self", "encoder_decoder"):
    for w in maps[kind]:
      assert w.dtype == jnp.float32
      np.testing.assert_allclose(np.sum(w, -1), 1.0, atol=1e-5)


def test_paired_bits_dropout_rate_and_scale():
  x = jnp.ones((8, 64, 128))
  drop = layers.PairedBitsDropout(rate=0.1)
  y = drop.apply({}, x, deterministic=False,
                 rngs={"dropout": jax.random.key(0)})
  kept = np.asarray(y) != 0
  assert abs(kept.mean() - 0.9) < 0.005
  np.testing.assert_allclose(np.asarray(y)[kept], 1 / 0.9, rtol=1e-6)
  # Independent halves: the two elements fed by one word are uncorrelated.
  lo, hi = kept[..., :64].ravel(), kept[..., 64:].ravel()
  assert abs(np.corrcoef(lo, hi)[0, 1]) < 0.02
  assert drop.apply({}, x, deterministic=True) is x


def test_paired_bits_dropout_is_a_config_switch():
  params = init_params(TINY, jax.random.key(0))
  src, tgt = _tokens(0, (2, 8)), _tokens(1, (2, 8))
  cfg = TINY.replace(dropout_impl="paired_bits")
  # Deterministic: identical to the default model.
  np.testing.assert_array_equal(
      Transformer(cfg).apply({"params": params}, src, tgt),
      Transformer(TINY).apply({"params": params}, src, tgt))
  noisy = Transformer(cfg).apply({"params": params}, src, tgt,
                                 deterministic=False,
                                 rngs={"dropout": jax.random.key(1)})
  assert np.all(np.isfinite(noisy))


def test_bf16_cached_decoding_follows_bf16_teacher_forcing():
  """The cached modules' bf16 path (heads-major caches) against the Flax
  attention's bf16 path over the whole target."""
  params = init_params(TINY, jax.random.key(0))
  src, tgt = _tokens(2, (2, 9)), _tokens(3, (2, 6))
  teacher = Transformer(TINY_BF16).apply({"params": params}, src, tgt)
  encoded = Transformer(TINY_BF16).apply({"params": params}, src,
                                         method=Transformer.encode)
  cache = init_cache(TINY_BF16, params, encoded, max_decode_len=6)
  model = Transformer(TINY_BF16, use_cache=True)
  token, steps = jnp.zeros((2, 1), jnp.int32), []
  for t in range(6):
    logits, variables = model.apply(
        {"params": params, "cache": cache}, encoded, src, token,
        method=Transformer.decode, mutable=["cache"])
    cache = variables["cache"]
    steps.append(logits[:, 0])
    token = tgt[:, t:t + 1]
  cached = jnp.stack(steps, 1)
  assert cached.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(cached), np.asarray(teacher), atol=0.05)


def test_argmax_equals_numpy_argmax_with_ties_and_infinities():
  rng = np.random.default_rng(0)
  # Small integers: many ties, which must resolve to the first index.
  x = rng.integers(-3, 4, size=(5, 7, 40)).astype(np.float32)
  x[0, 0] = -np.inf          # a row of -inf: index 0, as numpy says
  x[1, 2, 17] = np.inf       # one +inf wins
  x[2, 3, [4, 30]] = np.inf  # tied +infs: the first
  x[3, 1, [9, 20]] = np.nan  # NaN: the first NaN, as numpy says
  x[3, 2, 0] = np.nan
  got = jax.jit(layers.argmax)(jnp.asarray(x))
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(got), np.argmax(x, axis=-1))
  logits = rng.standard_normal((3, 8000)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(layers.argmax(logits)),
                                np.argmax(logits, axis=-1))
