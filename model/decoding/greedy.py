"""Greedy search and sampling: one hypothesis per row, a token a step."""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from model import layers
from model.config import EOS_ID, PAD_ID, TransformerConfig
from model.transformer import init_cache

from .cache import _cache_len
from .core import (_cached_step, _encode_for_search, _forbid_empty_output,
                   _mask_pad, _max_decode_len, _recomputed_step,
                   decode_limits, encoder_length)
from .filters import _check_knobs, _sample_token
from .segments import (COMPACT_EVERY, Search, check_compact_every,
                       run_one_loop, run_segments, search_mode)


@functools.partial(jax.jit, static_argnames=("config", "cache_len",
                                             "max_extra_len", "use_cache"))
def _one_hypothesis_start(config, params, src, encoded, cross, *,
                          cache_len: int, max_extra_len: int,
                          use_cache: bool):
  """The limits, an empty output and the first cache: the first state.

  encoded, cross: ``_encode_for_search``'s outputs.
  """
  batch = src.shape[0]
  max_decode_len, limits = decode_limits(config, src, max_extra_len)
  # seqs[:, 0] is the start token; step i writes the i-th output at i + 1.
  return dict(
      step=jnp.int32(0),
      seqs=jnp.full((batch, max_decode_len + 1), PAD_ID, jnp.int32),
      finished=jnp.zeros((batch,), bool), encoded=encoded, limits=limits,
      cache=(init_cache(config, params, encoded, cache_len, cross=cross)
             if use_cache else None))


@functools.partial(jax.jit, static_argnames=("config", "choose", "use_cache"),
                   donate_argnames=("state",))
def _one_hypothesis_segment(config, params, src, state, knobs, stop, *,
                            choose: Callable, use_cache: bool):
  """Token by token, until step ``stop`` (int32 scalar), the end of the
  cache's room, or every row has ended.

  ``choose(logits [b, V], step, knobs) -> [b]`` picks each row's token.
  """
  max_decode_len = state["seqs"].shape[1] - 1
  end = jnp.minimum(stop, _cache_len(state["cache"]) if use_cache
                    else max_decode_len)
  encoded, limits = state["encoded"], state["limits"]

  def cond(state):
    return (state["step"] < end) & ~jnp.all(state["finished"])

  def body(state):
    step, seqs, cache = state["step"], state["seqs"], state["cache"]
    if use_cache:
      fed = lax.dynamic_index_in_dim(seqs, step, axis=1, keepdims=False)
      logits, cache = _cached_step(config, params, encoded, src, fed, cache)
    else:
      logits = _recomputed_step(config, params, encoded, src, seqs, step)
    token = choose(_forbid_empty_output(_mask_pad(logits), step, src), step,
                   knobs)
    token = jnp.where(step + 1 >= limits, EOS_ID, token)  # length limit
    token = jnp.where(state["finished"], PAD_ID, token)   # pad after eos
    seqs = lax.dynamic_update_slice_in_dim(seqs, token[:, None], step + 1,
                                           axis=1)
    return dict(state, step=step + 1, seqs=seqs, cache=cache,
                finished=state["finished"] | (token == EOS_ID))

  return lax.while_loop(cond, body, state)


def _one_hypothesis_search(config, params, src, choose: Callable, knobs, *,
                           max_extra_len: int, use_cache: bool,
                           encoder_len: int) -> Search:
  """Token-by-token decoding of src as the shared loop runs it."""
  encoded, cross = _encode_for_search(config, params, src,
                                      encoder_len=encoder_len)
  return Search(
      start=lambda cache_len: _one_hypothesis_start(
          config, params, src, encoded, cross, cache_len=cache_len,
          max_extra_len=max_extra_len, use_cache=use_cache),
      segment=lambda state, src, stop: _one_hypothesis_segment(
          config, params, src, state, knobs, stop, choose=choose,
          use_cache=use_cache),
      rows_done=lambda state: state["finished"], outputs=("seqs",))


@functools.partial(jax.jit, static_argnames=("config", "choose",
                                             "max_extra_len", "use_cache"))
def _one_hypothesis_on_device(config, params, src, knobs, *, choose: Callable,
                              max_extra_len: int, use_cache: bool):
  """The whole search as one program (device mode): the encoder over src's
  whole width, then one loop over a cache of the batch's limit."""
  search = _one_hypothesis_search(
      config, params, src, choose, knobs, max_extra_len=max_extra_len,
      use_cache=use_cache, encoder_len=src.shape[1])
  out = run_one_loop(search, src, _max_decode_len(config, src, max_extra_len))
  return out["seqs"][:, 1:]


def _one_hypothesis_loop(config, params, src, choose: Callable, knobs,
                         max_extra_len: int, use_cache: bool,
                         grow_cache: bool, compact_rows: bool,
                         compact_every: int = COMPACT_EVERY,
                         mode: str = "auto"):
  """Token-by-token decoding: int32 [batch, max_decode_len]."""
  check_compact_every(compact_every)
  max_decode_len = _max_decode_len(config, src, max_extra_len)
  if search_mode(mode) == "device":
    return _one_hypothesis_on_device(
        config, params, src, knobs, choose=choose,
        max_extra_len=max_extra_len, use_cache=use_cache)
  search = _one_hypothesis_search(
      config, params, src, choose, knobs, max_extra_len=max_extra_len,
      use_cache=use_cache, encoder_len=encoder_length(src))
  out = run_segments(search, src, max_decode_len, grow_cache and use_cache,
                     compact_rows, compact_every)
  return out["seqs"][:, 1:]


def _argmax(logits, step, knobs):
  del step, knobs
  return layers.argmax(logits)


def _draw(logits, step, knobs):
  rng, temperature, top_k, top_p = knobs
  return _sample_token(jax.random.fold_in(rng, step), logits, temperature,
                       top_k, top_p)


def greedy_search(config: TransformerConfig, params, src, *,
                  max_extra_len: int = 50, use_cache: bool = True,
                  grow_cache: bool = True, compact_rows: bool = True,
                  compact_every: int = COMPACT_EVERY, mode: str = "auto"):
  """Argmax decoding: int32 [batch, max_decode_len] (see module docstring).

  use_cache=False recomputes the decoder over the whole prefix at each step
  (same tokens, much slower): the reference the cache is measured against.
  mode: "host", "device" or "auto" (see the package docstring). The host
  mode's knobs: grow_cache=False: one loop over a cache of the whole limit
  (jittable). compact_rows=False keeps ended rows in the batch to the end
  (the same tokens, see ``compacted_rows``); compact_every: the steps
  between checks for ended rows (0: only where the cache grows).
  """
  src = jnp.asarray(src, jnp.int32)
  return _one_hypothesis_loop(config, params, src, _argmax, None,
                              max_extra_len, use_cache, grow_cache,
                              compact_rows, compact_every, mode)


def sample(config: TransformerConfig, params, src, rng, *,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           max_extra_len: int = 50, grow_cache: bool = True,
           mode: str = "auto"):
  """Ancestral sampling with temperature, top-k, top-p (that order), seeded.

  rng: a jax.random key; the same key gives the same output. Step i draws
  with ``fold_in(rng, i)``. Returns int32 [batch, max_decode_len] (see the
  package docstring). mode: "host", "device" or "auto" (the package
  docstring); grow_cache=False (host mode): one loop over a cache of the
  whole limit (jittable). The batch keeps its ended rows to the end: each
  step draws for the whole batch at once, so dropping rows would change
  the draws of the others.
  """
  _check_knobs(temperature, top_k, top_p)
  knobs = (rng, jnp.float32(temperature), jnp.int32(top_k),
           jnp.float32(top_p))
  return _one_hypothesis_loop(config, params, jnp.asarray(src, jnp.int32),
                              _draw, knobs, max_extra_len, True, grow_cache,
                              compact_rows=False, mode=mode)
