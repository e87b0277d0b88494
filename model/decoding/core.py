"""What every search shares: lengths, the encoder, one decoder step, the
rules on output tokens (see the package docstring's conventions)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from model.config import EOS_ID, PAD_ID, TransformerConfig
from model.transformer import Transformer, cross_attention_cache

NEG_INF = -jnp.inf


def decode_limits(config: TransformerConfig, src, max_extra_len: int
                  ) -> tuple[int, jax.Array]:
  """(max_decode_len static int, per-row limits int32 [batch]).

  A row's limit is its source length + max_extra_len tokens (eos included),
  capped by max_decode_len, itself capped by the positional table (max_len).
  """
  max_decode_len = _max_decode_len(config, src, max_extra_len)
  src_lengths = jnp.sum(src != PAD_ID, axis=1).astype(jnp.int32)
  limits = jnp.minimum(src_lengths + max_extra_len, max_decode_len)
  return max_decode_len, limits


def _max_decode_len(config: TransformerConfig, src, max_extra_len: int) -> int:
  """decode_limits' static part, from src's shape alone (no device work)."""
  if max_extra_len < 1:
    raise ValueError(f"max_extra_len must be >= 1, got {max_extra_len}")
  return min(src.shape[1] + max_extra_len, config.max_len)




def length_penalty(length, alpha: float):
  """GNMT length penalty lp(Y) = ((5 + |Y|) / 6)^alpha (Wu et al. 2016, eq. 14).

  |Y| counts the generated tokens including eos. Scores are log P(Y) / lp(Y).
  """
  return ((5.0 + length) / 6.0) ** alpha


def _encode(config, params, src):
  return Transformer(config).apply({"params": params}, src,
                                   method=Transformer.encode)


# The encoder runs over a batch's longest source rounded up to a multiple of
# this many positions, not over the whole padded width of src: callers pad
# their batches to a few widths (train.translation's length buckets, up to
# twice the longest source) so that the search loops compile a few times,
# and an encoder over the padding cost what its positions cost (the
# 128-wide batch of the test split, its longest source 81 tokens: 951 ms
# against 381 ms cut to 81 positions). Its output and the cross-attention
# keys and values are padded back to src's width, which the masks hide.
# Each multiple the encoder meets compiles its own encoder program
# (``_encode_for_search``, shared by the searches); the search loops still
# compile per width.
ENCODER_LENGTH_MULTIPLE = 8


def encoder_length(src) -> int:
  """The positions of src [batch, width] the searches' encoder runs over.

  Up to the last non-pad token of any row, rounded up to a multiple of
  ``ENCODER_LENGTH_MULTIPLE``, at most the width; the width itself when src
  is traced (under an outer jax.jit, where no length can be read) or spans
  processes (each host holds part of it).
  """
  width = src.shape[1]
  if isinstance(src, jax.core.Tracer) or (
      isinstance(src, jax.Array) and not src.is_fully_addressable):
    return width
  positions = np.arange(1, width + 1)   # a pad token inside a row: kept
  longest = int(np.max(np.where(np.asarray(src) != PAD_ID, positions, 1),
                       initial=1))
  multiple = ENCODER_LENGTH_MULTIPLE
  return min(width, max(multiple, -(-longest // multiple) * multiple))


@functools.partial(jax.jit, static_argnames=("config", "encoder_len"))
def _encode_for_search(config, params, src, *, encoder_len: int):
  """(encoder output [batch, width, d_model], the cross-attention cache).

  The encoder and the cross-attention projections run over src's first
  encoder_len positions (``encoder_length``); both are padded back to src's
  width with zeros, behind its pad mask. One program per encoder length,
  whichever search runs after it.
  """
  width = src.shape[1]
  encoded = _encode(config, params, src[:, :encoder_len])
  cross = cross_attention_cache(config, params, encoded, src_len=width)
  return jnp.pad(encoded, ((0, 0), (0, width - encoder_len), (0, 0))), cross


def _cached_step(config, params, encoded, src, token, cache):
  """One decoder step: token int [b] -> (logits float32 [b, vocab], cache)."""
  logits, variables = Transformer(config, use_cache=True).apply(
      {"params": params, "cache": cache}, encoded, src, token[:, None],
      method=Transformer.decode, mutable=["cache"])
  return logits[:, 0], variables["cache"]


def _recomputed_step(config, params, encoded, src, seqs, step):
  """Next-token logits [b, vocab] recomputing the decoder over the prefix.

  No cache: the decoder runs teacher-forced over the whole (fixed-size)
  buffer and we read position ``step``. seqs: [b, L + 1], column 0 the start
  token, columns 1..step the tokens generated so far. The not-yet-generated
  positions hold EOS as a placeholder: the model masks queries whose target is
  PAD, and the causal mask keeps the placeholders out of position ``step``.
  """
  tgt = seqs[:, 1:]
  tgt = jnp.where(jnp.arange(tgt.shape[1]) >= step, EOS_ID, tgt)
  logits = Transformer(config).apply({"params": params}, encoded, src, tgt,
                                     method=Transformer.decode)
  return lax.dynamic_index_in_dim(logits, step, axis=1, keepdims=False)


def _mask_pad(logits):
  """PAD_ID is the start symbol, never an output."""
  return logits.at[..., PAD_ID].set(NEG_INF)


def _forbid_empty_output(scores, step, src):
  """No eos as the first token of a row whose source is non-empty.

  scores: [batch, ..., vocab] logits or log-probabilities of the token at
  ``step``; src: int [batch, src_len]. Rows of a non-empty source (more than
  its eos) get -inf for eos at step 0.
  """
  non_empty = jnp.sum(src != PAD_ID, axis=1) > 1
  first = (step == 0) & non_empty
  first = first.reshape(first.shape + (1,) * (scores.ndim - 1))
  return jnp.where(first & (jnp.arange(scores.shape[-1]) == EOS_ID), NEG_INF,
                   scores)



def strip_special(tokens) -> list[list[int]]:
  """Host-side: rows of ids [batch, length] -> lists cut at the first eos."""
  out = []
  for row in jax.device_get(tokens).tolist():
    ids = []
    for t in row:
      if t == EOS_ID:
        break
      if t != PAD_ID:
        ids.append(t)
    out.append(ids)
  return out
