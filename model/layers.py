"""Building blocks of the Transformer: positional encoding, attention, FFN.

Every parameter carries logical axis names (``nn.with_logical_partitioning``)
and activations at layer boundaries carry logical constraints, so a training
setup can shard both by a rules table (the experiment config's
``logical_axis_rules``).

Parameter axis names: ``vocab``, ``embed`` (d_model), ``heads``, ``kv``
(head_dim), ``mlp`` (d_ff). Activation axis names: ``activation_batch``,
``activation_length``, ``activation_embed``, ``activation_mlp``,
``activation_vocab``.
"""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from model.config import TransformerConfig

BLD = ("activation_batch", "activation_length", "activation_embed")


def constrain(x, names=BLD):
  """Logical sharding constraint on an activation (no-op without rules)."""
  return nn.with_logical_constraint(x, names)


class _LogicallyPartitioned(nn.LogicallyPartitioned):
  """Flax's box, but no sharding constraint on a value of another rank.

  Flax's DenseGeneral (the attention projections) initialises its kernel
  flat, [d_model, heads * head_dim], unboxes that temporary and reshapes it
  to [d_model, heads, head_dim]; under a mesh and logical rules the unbox
  would apply the 3-axis constraint to the 2-D temporary and fail. The
  temporary is left unconstrained; the final kernel is constrained as usual.
  """

  def unbox(self, apply_constraint=True):
    if self.value.ndim != len(self.names):
      return self.value
    return super().unbox(apply_constraint)


def _partitioned(init: Callable, names: tuple[str, ...]) -> Callable:
  """nn.with_logical_partitioning, with the box above."""
  def wrapper(*args, **kwargs):
    return _LogicallyPartitioned(init(*args, **kwargs), names)
  return wrapper


def dot_general(config: TransformerConfig):
  """The dot_general of every Dense: None (Flax's default) in float32.

  With a low-precision compute dtype the inputs are cast to it, but products
  accumulate and come out in float32 (``preferred_element_type``): bf16 outputs
  lose precision and are slower on CPUs without bf16 units.
  """
  if config.compute_dtype == jnp.float32:
    return None
  return functools.partial(jax.lax.dot_general,
                           preferred_element_type=jnp.float32)


def dot_product_attention(query, key, value, mask=None, dropout_rng=None,
                          dropout_rate: float = 0.0,
                          broadcast_dropout: bool = True,
                          deterministic: bool = True, dtype=jnp.float32,
                          module=None, kv_heads_major: bool = False,
                          keys_transposed: bool = False):
  """Section 3.2.1: softmax(Q K^T / sqrt(d_k)) V, the one attention kernel.

  query: [batch, q_len, heads, head_dim]; key, value: [batch, k_len, heads,
  head_dim], or [batch, heads, k_len, head_dim] with ``kv_heads_major`` (the
  decoding caches), the key [batch, heads, head_dim, k_len] with
  ``keys_transposed`` too (the cross-attention cache); mask: bool,
  broadcastable to [batch, heads, q_len, k_len]
  -> [batch, q_len, heads, head_dim] float32. Both matmuls take ``dtype``
  inputs and accumulate in float32; scores, the softmax and the weights sown
  for heat maps (``module``) are float32. The signature is Flax's
  ``attention_fn``'s, so ``nn.MultiHeadDotProductAttention`` calls it too.
  """
  # Both matmuls run heads-major ([batch, heads, length, head_dim], the
  # output swapped back): XLA's CPU kernels ran "bhqk,bkhd->bqhd" (weights
  # times [batch, k_len, heads, head_dim] values, heads-minor out) about 2.5x
  # slower than the same contraction heads-major, and an encoder's attention
  # 3x slower in all (64 x 128 positions, d_model 192, 4 heads; the same
  # values to float32 rounding).
  if not kv_heads_major:
    if keys_transposed:
      raise ValueError("keys_transposed needs kv_heads_major")
    key, value = jnp.swapaxes(key, 1, 2), jnp.swapaxes(value, 1, 2)
  depth = query.shape[-1]
  query = jnp.swapaxes(query / np.sqrt(depth).astype(np.float32), 1, 2)
  scores = jnp.einsum("bhqd,bhdk->bhqk" if keys_transposed else
                      "bhqd,bhkd->bhqk", query.astype(dtype),
                      key.astype(dtype), preferred_element_type=jnp.float32)
  if mask is not None:
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(scores)
  if module is not None:
    module.sow("intermediates", "attention_weights", weights)
  if not deterministic and dropout_rate > 0.0:
    keep_prob = 1.0 - dropout_rate
    shape = ((1,) * (weights.ndim - 2) + weights.shape[-2:]
             if broadcast_dropout else weights.shape)
    keep = jax.random.bernoulli(dropout_rng, keep_prob, shape)
    weights = jnp.where(keep, weights / keep_prob, 0.0)
  return jnp.swapaxes(
      jnp.einsum("bhqk,bhkd->bhqd", weights.astype(dtype),
                 value.astype(dtype), preferred_element_type=jnp.float32),
      1, 2)


def argmax(x):
  """Index of the largest value along the last axis (the first, on ties).

  ``jnp.argmax``'s result, int32: a row holding NaN gives its first NaN's
  index, as jnp.argmax does. Written out because XLA's CPU backend lowers
  jnp.argmax to a variadic (value, index) reduction that ran 5x slower than
  these two plain ones on [64, 8000] logits (2.4 against 0.45 ms): a greedy
  decoding step's choice, and training's accuracy over every target
  position.
  """
  last = x.ndim - 1
  is_max = (x == jnp.max(x, axis=last, keepdims=True)) | jnp.isnan(x)
  index = lax.broadcasted_iota(jnp.int32, x.shape, last)
  return jnp.min(jnp.where(is_max, index, x.shape[last]), axis=last)


class PairedBitsDropout(nn.Module):
  """Dropout drawing one 32-bit random word per two elements (a speed path).

  Each word's low and high 16 bits decide two elements (keep if bits <
  round(keep_prob * 2^16)), so half the threefry work of ``nn.Dropout``, whose
  random stream it does not reproduce; keep probabilities are exact to 2^-16.
  Same call signature as ``nn.Dropout``. x: any shape with an even last axis.
  """

  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    if deterministic or self.rate == 0.0:
      return x
    keep_prob = 1.0 - self.rate
    *lead, last = x.shape
    words = jax.random.bits(self.make_rng("dropout"), (*lead, 1, last // 2),
                            jnp.uint32)
    shifts = jnp.array([0, 16], jnp.uint32).reshape(2, 1)
    halves = (words >> shifts) & jnp.uint32(0xFFFF)      # [..., 2, last // 2]
    keep = (halves < jnp.uint32(round(keep_prob * 65536))).reshape(x.shape)
    return jnp.where(keep, x / jnp.asarray(keep_prob, x.dtype),
                     jnp.zeros_like(x))


def dropout(config: TransformerConfig) -> nn.Module:
  """Section 5.4's residual dropout: ``nn.Dropout`` unless configured otherwise."""
  if config.dropout_impl == "paired_bits" and config.d_model % 2 == 0:
    return PairedBitsDropout(rate=config.dropout_rate)
  return nn.Dropout(rate=config.dropout_rate)


def sinusoidal_table(max_len: int, d_model: int) -> np.ndarray:
  """Section 3.5: PE(pos, 2i) = sin(pos / 10000^(2i/d_model)), PE(pos, 2i+1) = cos(...).

  Returns float32 [max_len, d_model], sines and cosines interleaved as written.
  """
  positions = np.arange(max_len, dtype=np.float64)[:, None]
  two_i = np.arange(0, d_model, 2, dtype=np.float64)[None, :]
  angles = positions / np.power(10000.0, two_i / d_model)
  table = np.zeros((max_len, d_model), dtype=np.float64)
  table[:, 0::2] = np.sin(angles)
  table[:, 1::2] = np.cos(angles[:, : d_model // 2])
  return table.astype(np.float32)


def embedding(config: TransformerConfig, num_embeddings: int, name: str) -> nn.Embed:
  # Normal(0, d_model^-0.5): after the sqrt(d_model) scaling of section 3.4 the
  # inputs have unit variance, and the tied output logits start small.
  return nn.Embed(
      num_embeddings=num_embeddings,
      features=config.d_model,
      dtype=config.compute_dtype,
      param_dtype=jnp.float32,
      embedding_init=_partitioned(
          nn.initializers.normal(stddev=config.d_model**-0.5), ("vocab", "embed")),
      name=name)


def embed_tokens(config: TransformerConfig, embed: nn.Embed, tokens, positions,
                 dropout: nn.Dropout, deterministic: bool):
  """Token embedding * sqrt(d_model) + positional encoding, then dropout.

  tokens, positions: int [batch, length] -> [batch, length, d_model].
  """
  length = tokens.shape[-1]
  if length > config.max_len:
    raise ValueError(
        f"sequence length {length} exceeds TransformerConfig.max_len="
        f"{config.max_len}; raise max_len or truncate the inputs")
  x = embed(tokens) * jnp.sqrt(config.d_model).astype(config.compute_dtype)
  table = jnp.asarray(sinusoidal_table(config.max_len, config.d_model))
  x = x + table[positions].astype(config.compute_dtype)
  x = dropout(x, deterministic=deterministic)
  return constrain(x)


_XAVIER = nn.initializers.xavier_uniform()
_ZEROS = nn.initializers.zeros_init()


def attention(config: TransformerConfig, name: str
              ) -> nn.MultiHeadDotProductAttention:
  """Multi-head attention of section 3.2.2 (biases only with attention_bias).

  Training and teacher forcing; one-token decoding uses the cached modules
  below, which have the same parameters.
  """
  return nn.MultiHeadDotProductAttention(
      num_heads=config.num_heads,
      dtype=config.compute_dtype,
      param_dtype=jnp.float32,
      dropout_rate=config.attention_dropout_rate,
      use_bias=config.attention_bias,
      kernel_init=_partitioned(_XAVIER, ("embed", "heads", "kv")),
      bias_init=_partitioned(_ZEROS, ("heads", "kv")),
      out_kernel_init=_partitioned(_XAVIER, ("heads", "kv", "embed")),
      out_bias_init=_partitioned(_ZEROS, ("embed",)),
      qkv_dot_general=dot_general(config),
      out_dot_general=dot_general(config),
      attention_fn=functools.partial(dot_product_attention,
                                     dtype=config.compute_dtype),
      name=name)


# --- one-token decoding -------------------------------------------------------
#
# Flax's MultiHeadDotProductAttention (decode=True) is not used for decoding:
# it re-projects the encoder output into cross-attention keys and values at
# every generated token (about three quarters of a `small` decoder step's
# FLOPs), and its cache layout [batch, length, heads, head_dim] is not the one
# the attention matmuls read, so XLA on CPU copied (transposed) every layer's
# whole cache at every step. The modules below read the same parameters
# (query, key, value, out: names, shapes, dtypes) as ``attention(...)``, so one
# checkpoint serves training and decoding, and keep their keys and values
# heads-major, [batch, heads, length, head_dim], in place. The cross-attention
# keys and values are projected once per batch (``cross_keys_values``), once
# per sentence: the beams of a sentence share them (``CachedCrossAttention``).


def _projection(config: TransformerConfig, name: str, out: bool = False):
  """A DenseGeneral exactly as MultiHeadDotProductAttention builds it."""
  if out:
    features, axis, names = config.d_model, (-2, -1), ("heads", "kv", "embed")
  else:
    features, axis, names = ((config.num_heads, config.head_dim), -1,
                             ("embed", "heads", "kv"))
  return nn.DenseGeneral(
      features=features, axis=axis, dtype=config.compute_dtype,
      param_dtype=jnp.float32, use_bias=config.attention_bias,
      kernel_init=_partitioned(_XAVIER, names),
      bias_init=_partitioned(_ZEROS, names[1:] if not out else ("embed",)),
      dot_general=dot_general(config), name=name)


def _heads_major(config: TransformerConfig, x):
  """[batch, length, heads, head_dim] -> [batch, heads, length, head_dim],
  in the compute dtype (what the attention matmuls read)."""
  return jnp.swapaxes(x, 1, 2).astype(config.compute_dtype)


def _attend_cache(config: TransformerConfig, query, key, value, mask,
                  keys_transposed: bool = False):
  """dot_product_attention over a heads-major cache, in the compute dtype."""
  return dot_product_attention(
      query, key, value, mask, dtype=config.compute_dtype,
      kv_heads_major=True,
      keys_transposed=keys_transposed).astype(config.compute_dtype)


def cross_keys_values(config: TransformerConfig, params, encoded):
  """One decoder layer's cross-attention keys and values, once per batch.

  params: that layer's ``cross_attention`` params; encoded: the encoder
  output [batch, src_len, d_model] -> (key [batch, heads, head_dim,
  src_len], value [batch, heads, src_len, head_dim]) in the compute dtype
  (``CachedCrossAttention``'s cache).
  """
  project = lambda name: _heads_major(config, _projection(config, name).apply(
      {"params": params[name]}, encoded))
  return jnp.swapaxes(project("key"), 2, 3), project("value")


class CachedSelfAttention(nn.Module):
  """Masked decoder self-attention, one token per call, keys/values cached.

  Cache: ``cached_key``, ``cached_value`` [batch, heads, max_decode_len,
  head_dim]. The first call (``init``, no ``index``) takes the whole [batch,
  max_decode_len, d_model] target to size the cache and runs causal attention
  over it; later calls take one token y [batch, 1, d_model] and write its key
  and value at position ``index`` (int32 scalar: the decoder's counter).
  """

  config: TransformerConfig

  @nn.compact
  def __call__(self, y, index=None):
    cfg = self.config
    shape = (y.shape[0], cfg.num_heads, y.shape[1], cfg.head_dim)
    cached_key = self.variable("cache", "cached_key", jnp.zeros, shape,
                               cfg.compute_dtype)
    cached_value = self.variable("cache", "cached_value", jnp.zeros, shape,
                                 cfg.compute_dtype)
    query = _projection(cfg, "query")(y)
    key = _heads_major(cfg, _projection(cfg, "key")(y))
    value = _heads_major(cfg, _projection(cfg, "value")(y))
    if index is None:
      mask = nn.make_causal_mask(jnp.ones(y.shape[:2], bool))
    else:
      if y.shape[1] != 1:
        raise ValueError(f"cached decoding feeds one token per call, got "
                         f"{y.shape[1]}")
      zero = jnp.zeros((), jnp.int32)
      key = lax.dynamic_update_slice(cached_key.value, key,
                                     (zero, zero, index, zero))
      value = lax.dynamic_update_slice(cached_value.value, value,
                                       (zero, zero, index, zero))
      cached_key.value, cached_value.value = key, value
      mask = (jnp.arange(key.shape[2]) <= index)[None, None, None, :]
    x = _attend_cache(cfg, query, key, value, mask)
    return _projection(cfg, "out", out=True)(x)


class CachedCrossAttention(nn.Module):
  """Encoder-decoder attention, one token per call, keys/values cached.

  Cache: ``cross_key`` [sentences, heads, head_dim, src_len] (transposed:
  the score matmul's operand as it reads it) and ``cross_value``
  [sentences, heads, src_len, head_dim], filled once per batch by
  ``cross_keys_values`` (``init_cache``); a call projects only its query.
  The rows of y may be several hypotheses of each sentence (beam search's
  beams, row-major: row s * beams + k is beam k of sentence s): they share
  their sentence's keys and values and attend as that sentence's queries,
  one matmul of beams x src_len per sentence and head, instead of a copy of
  the keys and values per beam (read at every step: 4.0 against 0.6-1.4 ms a
  layer for 64 sentences x 4 beams over 128 source positions, measured).
  ``encoded`` sizes the cache when it is created. Inference only: no
  attention dropout.
  """

  config: TransformerConfig

  @nn.compact
  def __call__(self, y, encoded, mask=None):
    """y: [rows, length, d_model], rows = sentences * beams (length 1 when
    decoding; the whole target when the cache is created); mask: [rows, 1,
    length, src_len], the source's pad mask, the same for every query of a
    sentence -> [rows, length, d_model]."""
    cfg = self.config
    key = self.variable("cache", "cross_key", jnp.zeros,
                        (encoded.shape[0], cfg.num_heads, cfg.head_dim,
                         encoded.shape[1]), cfg.compute_dtype)
    value = self.variable("cache", "cross_value", jnp.zeros,
                          (encoded.shape[0], cfg.num_heads, encoded.shape[1],
                           cfg.head_dim), cfg.compute_dtype)
    sentences, (rows, length) = key.value.shape[0], y.shape[:2]
    if rows % sentences:
      raise ValueError(f"cached cross-attention takes a whole number of "
                       f"hypotheses per sentence: {rows} rows against "
                       f"{sentences} sentences")
    beams = rows // sentences
    # A sentence's beams (and positions) are one block of queries.
    query = _projection(cfg, "query")(y)   # [rows, length, heads, head_dim]
    query = query.reshape(sentences, beams * length, *query.shape[2:])
    if mask is not None:   # its first query's: [sentences, 1, 1, src_len]
      mask = mask.reshape(sentences, beams, *mask.shape[1:])[:, 0, :, :1]
    x = _attend_cache(cfg, query, key.value, value.value,
                      True if mask is None else mask, keys_transposed=True)
    return _projection(cfg, "out", out=True)(
        x.reshape(rows, length, *x.shape[2:]))


class FeedForward(nn.Module):
  """Section 3.3: FFN(x) = max(0, x W1 + b1) W2 + b2."""

  config: TransformerConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    dense = lambda features, names, name: nn.Dense(
        features,
        dtype=cfg.compute_dtype,
        param_dtype=jnp.float32,
        kernel_init=_partitioned(nn.initializers.xavier_uniform(), names),
        bias_init=_partitioned(nn.initializers.zeros_init(), names[1:]),
        dot_general=dot_general(cfg),
        name=name)
    h = nn.relu(dense(cfg.d_ff, ("embed", "mlp"), "wi")(x))
    h = constrain(h, ("activation_batch", "activation_length", "activation_mlp"))
    return dense(cfg.d_model, ("mlp", "embed"), "wo")(h)


def attend(config: TransformerConfig, embed: nn.Embed, y):
  """Section 3.4's tied pre-softmax projection: y @ embedding^T.

  y: [batch, length, d_model] -> logits [batch, length, vocab]. In float32
  this is ``nn.Embed.attend``; with a low-precision compute dtype the product
  takes bf16 inputs and accumulates (and returns) float32.
  """
  if config.compute_dtype == jnp.float32:
    return embed.attend(y)
  table = embed.embedding.astype(config.compute_dtype)
  return jnp.einsum("bld,vd->blv", y.astype(config.compute_dtype), table,
                    preferred_element_type=jnp.float32)


def layer_norm(config: TransformerConfig, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=config.layer_norm_epsilon,
      dtype=config.compute_dtype,
      param_dtype=jnp.float32,
      scale_init=_partitioned(nn.initializers.ones_init(), ("embed",)),
      bias_init=_partitioned(nn.initializers.zeros_init(), ("embed",)),
      name=name)


def residual(config: TransformerConfig, name: str, x, sublayer: Callable,
             deterministic: bool):
  """Section 5.4: LayerNorm(x + Dropout(Sublayer(x))), or pre-LN if configured.

  Call from inside a compact method: the LayerNorm is created in the caller's
  scope under ``<name>_norm``.
  """
  norm = layer_norm(config, f"{name}_norm")
  drop = dropout(config)
  if config.pre_ln:
    return x + drop(sublayer(norm(x)), deterministic=deterministic)
  return norm(x + drop(sublayer(x), deterministic=deterministic))
