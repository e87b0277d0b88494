"""The encoder-decoder Transformer of "Attention Is All You Need" (Flax linen).

Functional: ``Transformer(config).init(...)`` returns a params pytree and
``apply`` is pure. Entry points (all take int32 token ids, pad id 0):

  logits  = apply(v, src, tgt)                           # teacher forcing
  encoded = apply(v, src, method=Transformer.encode)     # [batch, src_len, d_model]
  logits  = apply(v, encoded, src, tgt, method=Transformer.decode)

``tgt`` holds the target sentence ending with eos; the decoder shifts it right
internally (start token = pad id 0). Packed rows pass ``*_segment_ids`` (1, 2,
... per pair, 0 for padding) and per-pair ``*_positions``; attention never
crosses pairs.

For one-token-at-a-time inference build ``Transformer(config, use_cache=True)``,
create the key/value cache with ``init_cache(config, params, encoded, ...)``
(which also projects the encoder output into the cross-attention keys and
values, once) and call ``decode`` with ``tgt`` = the previous token [batch, 1]
and ``mutable=["cache"]``; the cache's ``decoder/position`` counts the tokens
fed.

Params tree (documented names, for anyone opening a checkpoint):
  shared_embedding/embedding                [vocab, d_model]   (joint vocab)
  (or source_embedding, target_embedding and, untied, output_projection/kernel)
  encoder/layers_{i}/self_attention/{query,key,value}/kernel
                                            [d_model, heads, head_dim]
  encoder/layers_{i}/self_attention/out/kernel [heads, head_dim, d_model]
                                            (each with a bias only with
                                            attention_bias: [heads, head_dim],
                                            out [d_model])
  encoder/layers_{i}/self_attention_norm/{scale,bias}
  encoder/layers_{i}/ffn/wi/{kernel [d_model, d_ff], bias}, ffn/wo/{kernel, bias}
  encoder/layers_{i}/ffn_norm/{scale,bias}
  decoder/layers_{i}/{self_attention, cross_attention, ffn}(+ _norm) likewise
  encoder/final_norm, decoder/final_norm    (only with pre_ln)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from model import layers
from model.config import PAD_ID, TransformerConfig


def shift_right(tgt, segment_ids=None):
  """Decoder inputs: tgt shifted one step right, start token 0 at each pair."""
  shifted = jnp.pad(tgt, ((0, 0), (1, 0)), constant_values=PAD_ID)[:, :-1]
  if segment_ids is not None:
    prev = jnp.pad(segment_ids, ((0, 0), (1, 0)))[:, :-1]
    shifted = jnp.where(segment_ids == prev, shifted, PAD_ID)
  return shifted


def _default_positions(tokens):
  return jnp.broadcast_to(jnp.arange(tokens.shape[-1]), tokens.shape)


def _pair_mask(q_tokens, k_tokens, q_segments=None, k_segments=None):
  """[batch, 1, q_len, k_len]: both positions real and in the same pair."""
  mask = nn.make_attention_mask(q_tokens != PAD_ID, k_tokens != PAD_ID)
  if q_segments is not None:
    mask = nn.combine_masks(
        mask, nn.make_attention_mask(q_segments, k_segments, jnp.equal))
  return mask


class EncoderLayer(nn.Module):
  config: TransformerConfig

  @nn.compact
  def __call__(self, x, mask, deterministic: bool):
    """x: [batch, src_len, d_model]; mask: [batch, 1, src_len, src_len]."""
    cfg = self.config
    self_attention = layers.attention(cfg, "self_attention")
    x = layers.residual(
        cfg, "self_attention", x,
        lambda h: self_attention(h, h, mask=mask, deterministic=deterministic,
                                 sow_weights=True),
        deterministic)
    x = layers.residual(cfg, "ffn", x, layers.FeedForward(cfg, name="ffn"),
                        deterministic)
    return layers.constrain(x)


class DecoderLayer(nn.Module):
  config: TransformerConfig
  decode: bool = False

  @nn.compact
  def __call__(self, y, encoded, self_mask, cross_mask, deterministic: bool,
               index=None):
    """y: [batch, tgt_len, d_model]; encoded: [batch, src_len, d_model].

    decode: one token a call, written to the caches at ``index`` (None while
    the caches are created); the cache applies causality itself.
    """
    cfg = self.config
    if self.decode:
      self_attention = layers.CachedSelfAttention(cfg, name="self_attention")
      cross_attention = layers.CachedCrossAttention(cfg, name="cross_attention")
      attend_prefix = lambda h: self_attention(h, index)
      attend_encoded = lambda h: cross_attention(h, encoded, cross_mask)
    else:
      self_attention = layers.attention(cfg, "self_attention")
      cross_attention = layers.attention(cfg, "cross_attention")
      attend_prefix = lambda h: self_attention(
          h, h, mask=self_mask, deterministic=deterministic, sow_weights=True)
      attend_encoded = lambda h: cross_attention(
          h, encoded, mask=cross_mask, deterministic=deterministic,
          sow_weights=True)
    y = layers.residual(cfg, "self_attention", y, attend_prefix, deterministic)
    y = layers.residual(cfg, "cross_attention", y, attend_encoded,
                        deterministic)
    y = layers.residual(cfg, "ffn", y, layers.FeedForward(cfg, name="ffn"),
                        deterministic)
    return layers.constrain(y)


class Encoder(nn.Module):
  config: TransformerConfig
  embed: nn.Module

  @nn.compact
  def __call__(self, src, src_segment_ids=None, src_positions=None,
               deterministic: bool = True):
    """src: int [batch, src_len] -> [batch, src_len, d_model]."""
    cfg = self.config
    if src_positions is None:
      src_positions = _default_positions(src)
    x = layers.embed_tokens(cfg, self.embed, src, src_positions,
                            layers.dropout(cfg), deterministic)
    mask = _pair_mask(src, src, src_segment_ids, src_segment_ids)
    for i in range(cfg.num_encoder_layers):
      x = EncoderLayer(cfg, name=f"layers_{i}")(x, mask, deterministic)
    if cfg.pre_ln:
      x = layers.layer_norm(cfg, "final_norm")(x)
    return x


class Decoder(nn.Module):
  config: TransformerConfig
  embed: nn.Module
  decode: bool = False

  @nn.compact
  def __call__(self, encoded, decoder_inputs, self_mask, cross_mask,
               tgt_positions=None, deterministic: bool = True):
    """decoder_inputs: int [batch, tgt_len] -> [batch, tgt_len, d_model].

    decode: the cache's one counter, ``position``, is the position of the
    token fed (its positional encoding and its slot in every layer's cache).
    """
    cfg = self.config
    index = None
    if self.decode:
      initialized = self.has_variable("cache", "position")
      position = self.variable("cache", "position",
                               lambda: jnp.zeros((), jnp.int32))
      if initialized:
        index = position.value
        tgt_positions = jnp.broadcast_to(index, decoder_inputs.shape)
        position.value = index + 1
    if tgt_positions is None:
      tgt_positions = _default_positions(decoder_inputs)
    y = layers.embed_tokens(cfg, self.embed, decoder_inputs, tgt_positions,
                            layers.dropout(cfg), deterministic)
    for i in range(cfg.num_decoder_layers):
      y = DecoderLayer(cfg, decode=self.decode, name=f"layers_{i}")(
          y, encoded, self_mask, cross_mask, deterministic, index)
    if cfg.pre_ln:
      y = layers.layer_norm(cfg, "final_norm")(y)
    return y


class Transformer(nn.Module):
  """Encoder-decoder Transformer; see the module docstring for the API."""

  config: TransformerConfig
  use_cache: bool = False  # one-token-at-a-time decoding with a KV cache

  def setup(self):
    cfg = self.config
    if cfg.share_embeddings:
      self.source_embedding = layers.embedding(cfg, cfg.vocab_size,
                                               "shared_embedding")
      self.target_embedding = self.source_embedding
    else:
      self.source_embedding = layers.embedding(cfg, cfg.vocab_size,
                                               "source_embedding")
      self.target_embedding = layers.embedding(cfg, cfg.output_vocab_size,
                                               "target_embedding")
      if not cfg.tie_output_embedding:
        self.output_projection = nn.Dense(
            cfg.output_vocab_size, use_bias=False, dtype=cfg.compute_dtype,
            param_dtype=jnp.float32, dot_general=layers.dot_general(cfg),
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.xavier_uniform(), ("embed", "vocab")))
    self.encoder = Encoder(cfg, self.source_embedding)
    self.decoder = Decoder(cfg, self.target_embedding, decode=self.use_cache)

  def encode(self, src, src_segment_ids=None, src_positions=None,
             deterministic: bool = True):
    """src: int [batch, src_len] -> encoded [batch, src_len, d_model]."""
    return self.encoder(src, src_segment_ids, src_positions, deterministic)

  def decode(self, encoded, src, tgt, src_segment_ids=None,
             tgt_segment_ids=None, tgt_positions=None,
             deterministic: bool = True):
    """Logits float32 [batch, tgt_len, vocab] of each next target token.

    Teacher forcing: tgt is the whole target (shifted right here). With
    ``use_cache=True``: tgt is the previous token [batch, 1], fed as it is.
    """
    if self.use_cache:
      decoder_inputs = tgt
      self_mask = None  # the cache applies causality itself
      cross_mask = nn.make_attention_mask(jnp.ones_like(tgt, bool),
                                          src != PAD_ID)
    else:
      decoder_inputs = shift_right(tgt, tgt_segment_ids)
      self_mask = nn.combine_masks(
          _pair_mask(tgt, tgt, tgt_segment_ids, tgt_segment_ids),
          nn.make_causal_mask(tgt))
      cross_mask = _pair_mask(tgt, src, tgt_segment_ids, src_segment_ids)
    y = self.decoder(encoded, decoder_inputs, self_mask, cross_mask,
                     tgt_positions, deterministic)
    if self.config.share_embeddings or self.config.tie_output_embedding:
      logits = layers.attend(self.config, self.target_embedding, y)  # 3.4: tied
    else:
      logits = self.output_projection(y)  # float32 accumulation (layers.dot_general)
    logits = layers.constrain(
        logits, ("activation_batch", "activation_length", "activation_vocab"))
    return logits.astype(jnp.float32)

  def __call__(self, src, tgt, src_segment_ids=None, tgt_segment_ids=None,
               src_positions=None, tgt_positions=None,
               deterministic: bool = True):
    """Teacher-forced logits float32 [batch, tgt_len, vocab]."""
    encoded = self.encode(src, src_segment_ids, src_positions, deterministic)
    return self.decode(encoded, src, tgt, src_segment_ids, tgt_segment_ids,
                       tgt_positions, deterministic)


def init_params(config: TransformerConfig, rng, src_len: int = 8,
                tgt_len: int = 8):
  """Fresh params pytree (logical-axis boxes removed)."""
  src = jnp.ones((1, src_len), jnp.int32)
  tgt = jnp.ones((1, tgt_len), jnp.int32)
  variables = Transformer(config).init(rng, src, tgt)
  return nn.unbox(variables["params"])


def cross_attention_cache(config: TransformerConfig, params, encoded,
                          src_len: int | None = None) -> dict[str, Any]:
  """Every decoder layer's cross-attention keys and values: {layer name:
  {"cross_key", "cross_value"}}, ``init_cache``'s, projected from encoded
  [batch, encoded_len, d_model] once per sentence.

  src_len: padded with zeros to this many positions (default: encoded's),
  for a source padded beyond the positions the encoder ran over; the
  decoder's mask (src != PAD_ID) hides them.
  """
  encoded_len = encoded.shape[1]
  src_len = encoded_len if src_len is None else src_len
  if src_len < encoded_len:
    raise ValueError(f"src_len={src_len} is shorter than the encoder output "
                     f"({encoded_len} positions)")
  pad = src_len - encoded_len
  cross = {}
  for i in range(config.num_decoder_layers):
    layer = f"layers_{i}"
    key, value = layers.cross_keys_values(
        config, params["decoder"][layer]["cross_attention"], encoded)
    cross[layer] = {
        "cross_key": jnp.pad(key, ((0, 0), (0, 0), (0, 0), (0, pad))),
        "cross_value": jnp.pad(value, ((0, 0), (0, 0), (0, pad), (0, 0)))}
  return cross


def init_cache(config: TransformerConfig, params, encoded,
               max_decode_len: int, repeat: int = 1, cross=None) -> Any:
  """The cache of ``Transformer(config, use_cache=True)`` for one batch.

  encoded: the encoder output [batch, src_len, d_model]. Self-attention
  keys/values start empty, with room for ``max_decode_len`` tokens (the
  searches pass their first cache length and pad the cache as it fills:
  ``decoding.cache_lengths``); the
  cross-attention keys/values are projected from ``encoded`` here, once
  (``cross_attention_cache``), or given as ``cross``, its output (padded
  beyond encoded's positions with its src_len).
  repeat: the cache is for batch * repeat rows, each sentence's ``repeat``
  rows in a row (beam search's beams): the self-attention keys/values have
  a row each, the cross-attention keys/values one per sentence, which its
  rows share (``layers.CachedCrossAttention``).
  """
  model = Transformer(config, use_cache=True)
  if cross is None:
    cross = cross_attention_cache(config, params, encoded)
  src_len = cross["layers_0"]["cross_value"].shape[2]
  batch_size = encoded.shape[0] * repeat
  src = jnp.ones((batch_size, src_len), jnp.int32)
  tgt = jnp.ones((batch_size, max_decode_len), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), src, tgt))
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                       nn.unbox(shapes["cache"]))
  for layer, keys_values in cross.items():
    cache["decoder"][layer]["cross_attention"] = dict(keys_values)
  return cache


def attention_weights(config: TransformerConfig, params, src, tgt
                      ) -> dict[str, list[jax.Array]]:
  """Attention maps of every layer, for heat maps.

  Returns {"encoder_self", "decoder_self", "encoder_decoder"}, each a list
  (one per layer) of float32 [batch, heads, query_len, key_len]; rows sum to
  one, masked keys get zero.
  """
  _, state = Transformer(config).apply(
      {"params": params}, src, tgt, mutable=["intermediates"])
  inter = state["intermediates"]
  get = lambda part, n, kind: [
      inter[part][f"layers_{i}"][kind]["attention_weights"][0]
      for i in range(n)]
  return {
      "encoder_self": get("encoder", config.num_encoder_layers,
                          "self_attention"),
      "decoder_self": get("decoder", config.num_decoder_layers,
                          "self_attention"),
      "encoder_decoder": get("decoder", config.num_decoder_layers,
                             "cross_attention"),
  }
