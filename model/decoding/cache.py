"""The self-attention cache's lengths: a search's segments grow it."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# The first segment's cache length; each next one doubles it
# (``cache_lengths``).
FIRST_CACHE_LEN = 16
_SELF_ATTENTION_CACHE = ("cached_key", "cached_value")


def cache_lengths(max_decode_len: int, grow: bool = True) -> list[int]:
  """Self-attention cache lengths of a search's segments, in order.

  16, 32, 64, ... (each below max_decode_len), then max_decode_len; or
  [max_decode_len] alone without ``grow``. A segment decodes the steps its
  cache has room for beyond the previous one's; attention and beam copies
  then cost the positions that exist, at most twice the filled ones.
  """
  lengths = []
  length = FIRST_CACHE_LEN
  while grow and length < max_decode_len:
    lengths.append(length)
    length *= 2
  return lengths + [max_decode_len]


@functools.partial(jax.jit, static_argnums=1)
def _grow_cache(cache, length: int):
  """The self-attention caches [rows, heads, old, head_dim] padded to length."""
  def grow(path, x):
    if path[-1].key not in _SELF_ATTENTION_CACHE:
      return x
    return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, 0)))
  return jax.tree_util.tree_map_with_path(grow, cache)


def _cache_len(cache) -> int:
  """The length the self-attention caches have room for."""
  return jax.tree_util.tree_leaves(cache["decoder"]["layers_0"]
                                   ["self_attention"])[0].shape[2]

