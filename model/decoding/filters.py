"""Sampling's filters: temperature, top-k and top-p over the logits, and a
seeded draw from what they keep."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .core import NEG_INF

# Tolerance for "the cumulative probability has reached top_p": 0.40 + 0.30 +
# 0.15 rounds to 0.84999996 in float32, which must count as reaching 0.85.
_TOP_P_TOLERANCE = 1e-6


def _check_knobs(temperature, top_k, top_p):
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}; use greedy "
                     "search for the argmax")
  if top_k < 0:
    raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must lie in (0, 1], got {top_p}")


def filter_logits(logits, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0):
  """Temperature, then top-k, then top-p (nucleus), in that order.

  logits: float [..., vocab]. Filtered-out tokens get -inf; softmax of the
  result is the renormalised distribution that ``sample_token`` draws from.
  top_k=0 and top_p=1.0 disable those filters. Tokens tied with the k-th (or
  the last nucleus) logit are kept too.
  """
  _check_knobs(temperature, top_k, top_p)
  return _filter_logits(logits, temperature, top_k, top_p)


@jax.jit
def _filter_logits(logits, temperature, top_k, top_p):
  """filter_logits with traced knobs: one compilation serves every setting."""
  logits = logits.astype(jnp.float32) / temperature
  sorted_logits = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)
  vocab = logits.shape[-1]
  # Top-k: keep logits >= the k-th largest (k = 0: keep all).
  kth = jnp.take(sorted_logits, jnp.clip(top_k - 1, 0, vocab - 1), axis=-1)
  kth = jnp.where(top_k > 0, kth, -jnp.inf)[..., None]
  logits = jnp.where(logits < kth, NEG_INF, logits)
  sorted_logits = jnp.where(sorted_logits < kth, NEG_INF, sorted_logits)
  # Top-p (Holtzman et al. 2020): the smallest set of most likely tokens
  # whose probability, renormalised after top-k, sums to at least top_p.
  sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
  keep = (mass_before < top_p - _TOP_P_TOLERANCE) | (top_p >= 1.0)
  keep = keep.at[..., 0].set(True)
  threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1,
                      keepdims=True)
  return jnp.where(logits < threshold, NEG_INF, logits)


def sample_token(rng, logits, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0):
  """Draws int32 [...] from softmax(filter_logits(logits [..., vocab]))."""
  _check_knobs(temperature, top_k, top_p)
  return _sample_token(rng, logits, temperature, top_k, top_p)


@jax.jit
def _sample_token(rng, logits, temperature, top_k, top_p):
  filtered = _filter_logits(logits, temperature, top_k, top_p)
  return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)

