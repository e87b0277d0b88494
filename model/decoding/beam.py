"""Beam search with the GNMT length penalty over the shared loop."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from model.config import EOS_ID, PAD_ID, TransformerConfig
from model.transformer import init_cache

from .beam_slots import (_copy_histories, _gather_beams, _gather_histories,
                         _keep_slots, top_k)
from .cache import _cache_len
from .core import (NEG_INF, _cached_step, _encode_for_search,
                   _forbid_empty_output, _mask_pad, _max_decode_len,
                   decode_limits, encoder_length, length_penalty)
from .segments import (COMPACT_EVERY, Search, check_compact_every,
                       run_one_loop, run_segments, search_mode)


class BeamSearchResult(NamedTuple):
  sequences: jax.Array  # int32 [batch, beam, max_decode_len], best first
  scores: jax.Array     # float32 [batch, beam]: log P / length_penalty


@functools.partial(jax.jit, static_argnames=("config", "beam_size",
                                             "cache_len", "max_extra_len"))
def _beam_start(config, params, src, encoded, cross, *, beam_size: int,
                cache_len: int, max_extra_len: int):
  """The first state of beam search: only beam 0 of each row alive.

  encoded, cross: ``_encode_for_search``'s outputs, once per sentence: the
  cross-attention cache is shared by a sentence's beams, the encoder output
  repeated for them (row-major: flat row b * beam_size + k is beam k of
  sentence b).
  """
  batch = src.shape[0]
  max_decode_len, limits = decode_limits(config, src, max_extra_len)
  cache = init_cache(config, params, encoded, cache_len, repeat=beam_size,
                     cross=cross)
  encoded = jnp.repeat(encoded, beam_size, axis=0)
  seq_shape = (batch, beam_size, max_decode_len + 1)  # column 0: start token
  # Only beam 0 starts alive; the others at -inf never become duplicates.
  alive_log_probs = jnp.where(jnp.arange(beam_size) == 0, 0.0, NEG_INF)
  return dict(
      step=jnp.int32(0),
      alive_seqs=jnp.full(seq_shape, PAD_ID, jnp.int32),
      alive_log_probs=jnp.broadcast_to(alive_log_probs, (batch, beam_size)),
      finished_seqs=jnp.full(seq_shape, PAD_ID, jnp.int32),
      finished_scores=jnp.full((batch, beam_size), NEG_INF),
      num_finished=jnp.zeros((batch,), jnp.int32),
      encoded=encoded, limits=limits, cache=cache)


def _rows_done(state, beam_size: int):
  """[batch] bool: beam_size finished, limit reached, or nothing alive."""
  return ((state["num_finished"] >= beam_size) |
          (state["step"] >= state["limits"]) |
          (jnp.max(state["alive_log_probs"], axis=1) == NEG_INF))


def _extensions(config, params, src, flat_src, state, beam_size: int):
  """The 2k best one-token extensions of each sentence's hypotheses.

  Returns (their log P [b, 2k], parent slots [b, 2k], tokens [b, 2k],
  sequences [b, 2k, max_decode_len + 1], the cache after the step).
  """
  batch, vocab = src.shape[0], config.output_vocab_size
  step, alive_seqs = state["step"], state["alive_seqs"]
  fed = lax.dynamic_index_in_dim(alive_seqs, step, axis=2, keepdims=False)
  logits, cache = _cached_step(config, params, state["encoded"], flat_src,
                               fed.reshape(-1), state["cache"])
  log_probs = _forbid_empty_output(
      jax.nn.log_softmax(_mask_pad(logits)).reshape(batch, beam_size, vocab),
      step, src)
  # At its length limit a hypothesis can only end.
  at_limit = (step + 1 >= state["limits"])[:, None, None]
  log_probs = jnp.where(at_limit & (jnp.arange(vocab) != EOS_ID), NEG_INF,
                        log_probs)
  total = state["alive_log_probs"][:, :, None] + log_probs  # [b, k, V]
  # The 2k best extensions: at most k of them end in eos (one per parent),
  # so at least k non-eos ones remain to refill the beam.
  top_log_probs, flat_index = top_k(
      total.reshape(batch, beam_size * vocab), 2 * beam_size)
  parent, token = flat_index // vocab, (flat_index % vocab).astype(jnp.int32)
  top_seqs = lax.dynamic_update_slice_in_dim(
      _gather_beams(alive_seqs, parent), token[:, :, None], step + 1, axis=2)
  return top_log_probs, parent, token, top_seqs, cache


def _finish(state, top_log_probs, is_eos, top_seqs, stopped, alpha,
            beam_size: int) -> dict:
  """The finished hypotheses after a step: eos extensions among the k
  best join them, unless their sentence had stopped (``stopped`` [b, 1])."""
  step = state["step"]
  newly_finished = (is_eos & (jnp.arange(2 * beam_size) < beam_size) &
                    (top_log_probs > NEG_INF) & ~stopped)
  new_scores = jnp.where(
      newly_finished,
      top_log_probs / length_penalty((step + 1).astype(jnp.float32), alpha),
      NEG_INF)
  finished_scores, keep = lax.top_k(
      jnp.concatenate([state["finished_scores"], new_scores], axis=1),
      beam_size)
  finished_seqs = _gather_beams(
      jnp.concatenate([state["finished_seqs"], top_seqs], axis=1), keep)
  return dict(finished_seqs=finished_seqs, finished_scores=finished_scores,
              num_finished=state["num_finished"] +
              jnp.sum(newly_finished, axis=1))


def _refill(top_log_probs, parent, is_eos, top_seqs, cache, stopped,
            beam_size: int, gather_cache: bool) -> dict:
  """The alive hypotheses after a step: the k best non-eos extensions,
  each put in a slot (``_keep_slots``: the slots, not their order, hold the
  beam), their histories moved there in the cache (``_copy_histories``,
  or ``_gather_histories`` with gather_cache)."""
  alive_log_probs, pick = lax.top_k(
      jnp.where(is_eos, NEG_INF, top_log_probs), beam_size)
  parent = jnp.take_along_axis(parent, pick, axis=1)
  slot, copied = _keep_slots(parent, beam_size)
  in_slot = jnp.argsort(slot, axis=1)   # the new hypothesis of each slot
  move = _gather_histories if gather_cache else _copy_histories
  cache = move(cache, parent, slot, copied & ~stopped, beam_size)
  return dict(alive_seqs=_gather_beams(
                  top_seqs, jnp.take_along_axis(pick, in_slot, axis=1)),
              alive_log_probs=jnp.take_along_axis(alive_log_probs, in_slot,
                                                  axis=1),
              cache=cache)


@functools.partial(jax.jit, static_argnames=("config", "beam_size",
                                             "gather_cache"),
                   donate_argnames=("state",))
def _beam_segment(config, params, src, state, alpha, stop, *,
                  beam_size: int, gather_cache: bool = False):
  """Until step ``stop`` (int32 scalar), the end of the cache's room, or
  every row is done.

  alpha: a traced float32, so every length penalty shares one compilation.
  gather_cache: how histories move (``_refill``).
  """
  end = jnp.minimum(stop, _cache_len(state["cache"]))
  flat_src = jnp.repeat(src, beam_size, axis=0)

  def cond(state):
    return (state["step"] < end) & ~jnp.all(_rows_done(state, beam_size))

  def body(state):
    stopped = _rows_done(state, beam_size)[:, None]
    top_log_probs, parent, token, top_seqs, cache = _extensions(
        config, params, src, flat_src, state, beam_size)
    is_eos = token == EOS_ID
    return dict(state, step=state["step"] + 1,
                **_finish(state, top_log_probs, is_eos, top_seqs, stopped,
                          alpha, beam_size),
                **_refill(top_log_probs, parent, is_eos, top_seqs, cache,
                          stopped, beam_size, gather_cache))

  return lax.while_loop(cond, body, state)


def _beam(config, params, src, alpha, *, beam_size: int, max_extra_len: int,
          encoder_len: int, gather_cache: bool) -> Search:
  """Beam search over src as the shared loop runs it."""
  encoded, cross = _encode_for_search(config, params, src,
                                      encoder_len=encoder_len)
  return Search(
      start=lambda cache_len: _beam_start(
          config, params, src, encoded, cross, beam_size=beam_size,
          cache_len=cache_len, max_extra_len=max_extra_len),
      segment=lambda state, src, stop: _beam_segment(
          config, params, src, state, alpha, stop, beam_size=beam_size,
          gather_cache=gather_cache),
      rows_done=lambda state: _rows_done(state, beam_size),
      outputs=("finished_seqs", "finished_scores"), beam_size=beam_size)


@functools.partial(jax.jit, static_argnames=("config", "beam_size",
                                             "max_extra_len"))
def _beam_on_device(config, params, src, alpha, *, beam_size: int,
                    max_extra_len: int):
  """The whole search as one program (device mode): the encoder over src's
  whole width, then one loop over a cache of the batch's limit."""
  search = _beam(config, params, src, alpha, beam_size=beam_size,
                 max_extra_len=max_extra_len, encoder_len=src.shape[1],
                 gather_cache=True)
  out = run_one_loop(search, src, _max_decode_len(config, src, max_extra_len))
  return out["finished_seqs"], out["finished_scores"]


def beam_search(config: TransformerConfig, params, src, *, beam_size: int = 4,
                alpha: float = 0.6, max_extra_len: int = 50,
                grow_cache: bool = True, compact_rows: bool = True,
                compact_every: int = COMPACT_EVERY,
                mode: str = "auto") -> BeamSearchResult:
  """Beam search with the GNMT length penalty (the paper: beam 4, alpha 0.6).

  Each row keeps a beam of ``beam_size`` hypotheses. At each step every
  hypothesis is extended by every token and the ``beam_size`` most probable
  extensions (by log P) are the new beam; an extension ending in eos leaves
  the beam as *finished* (scored log P / lp) and the next most probable
  non-eos extension takes its place, so ``beam_size`` hypotheses stay alive.
  A row stops when ``beam_size`` hypotheses have finished (or its length
  limit forces eos on the rest); the search stops when every row has stopped.
  The answer is the finished hypothesis of highest score. With beam 1 this is
  exactly greedy search; with a beam wider than the set of all sequences it
  is an exhaustive search. mode: "host", "device" or "auto" (see the
  package docstring). The host mode's knobs: grow_cache=False: one loop
  over a cache of the whole limit (jittable). compact_rows=False keeps the
  sentences that have ended in the batch to the end (the same result, see
  ``compacted_rows``); compact_every: the steps between checks for ended
  sentences (0: only where the cache grows).

  Returns sequences [batch, beam, max_decode_len] and their scores
  [batch, beam], best first (the first is the translation). Slots of rows
  with fewer than ``beam_size`` finished hypotheses score -inf.
  """
  if beam_size < 1:
    raise ValueError(f"beam_size must be >= 1, got {beam_size}")
  check_compact_every(compact_every)
  src = jnp.asarray(src, jnp.int32)
  max_decode_len = _max_decode_len(config, src, max_extra_len)
  alpha = jnp.float32(alpha)
  if search_mode(mode) == "device":
    seqs, scores = _beam_on_device(config, params, src, alpha,
                                   beam_size=beam_size,
                                   max_extra_len=max_extra_len)
  else:
    search = _beam(config, params, src, alpha, beam_size=beam_size,
                   max_extra_len=max_extra_len,
                   encoder_len=encoder_length(src), gather_cache=False)
    out = run_segments(search, src, max_decode_len, grow_cache, compact_rows,
                       compact_every)
    seqs, scores = out["finished_seqs"], out["finished_scores"]
  # Every row has at least one finished hypothesis: the limit forces eos.
  return BeamSearchResult(seqs[:, :, 1:], scores)
