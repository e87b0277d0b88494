"""Inference: KV-cached greedy search, beam search and sampling.

Every search is batched and feeds one token per step through the decoder's
key/value cache (``Transformer(config, use_cache=True)``); the encoder runs
once per batch. The steps run in jitted ``lax.while_loop`` segments over a
self-attention cache that grows to the filled length (``cache_lengths``: 16,
32, 64, ... tokens, then the batch's limit), as CTranslate2's does: a step
attends over (and beam search copies) the positions that exist, not the
batch's whole limit; a batch stops at the step its last row ends, and no
later segment is launched. ``grow_cache=False`` runs one segment over the
whole limit: the same tokens, in one loop that an outer ``jax.jit`` can
trace (the default reads each row's "ended?" on the host between segments).
Between segments, greedy and beam search also drop the rows (sentences)
whose search has ended once at most half are still decoding
(``compacted_rows``; ``compact_rows=False`` keeps them), checking every
``COMPACT_EVERY`` steps: the long tail of a batch then runs at a half or a
quarter of its rows. The tokens are those of
the whole batch as long as a matmul's rows do not depend on how many rows
it has (measured identical on this CPU; other kernels may round differently).

Conventions shared by all searches:
  * ``src``: int32 [batch, src_len], padded with PAD_ID. A row's source length
    is its number of non-pad tokens.
  * Output length: at most ``source length + max_extra_len`` tokens per row
    (the paper's "input + 50"), eos included, and never more than
    ``max_decode_len = min(src_len + max_extra_len, config.max_len)``. A
    hypothesis that reaches its limit is ended with EOS_ID (the model's own
    log-probability of eos is what it scores).
  * PAD_ID is the decoder's start symbol and is never generated.
  * A non-empty source (more than its eos) never gets an empty translation:
    eos is not allowed as the first output token of such a row
    (``_forbid_empty_output``); an empty source may end at once.
  * Returned sequences exclude the start symbol, end with EOS_ID and are
    PAD_ID after it: int32 [batch, max_decode_len]
    (beam search: [batch, beam, max_decode_len], best first).

Public functions: ``greedy_search``, ``beam_search``, ``sample``,
``filter_logits``, ``sample_token``, ``length_penalty``, ``decode_limits``,
``cache_lengths``, ``compacted_rows``, ``encoder_length``, ``top_k``.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from model import layers
from model.config import EOS_ID, PAD_ID, TransformerConfig
from model.transformer import Transformer, cross_attention_cache, init_cache

NEG_INF = -jnp.inf
# Tolerance for "the cumulative probability has reached top_p": 0.40 + 0.30 +
# 0.15 rounds to 0.84999996 in float32, which must count as reaching 0.85.
_TOP_P_TOLERANCE = 1e-6


# --------------------------------------------------------------------------
# Lengths and the model calls
# --------------------------------------------------------------------------

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


# Between segments, rows whose search has ended are dropped once at most
# half the rows are still decoding: the batch shrinks by halves while it
# stays >= a quarter of its first size (rounded up), so a search compiles at
# most three batch sizes per cache length (each size is its own program).
# Only in a single process: a multi-host search's row flags and outputs
# stay where they are (its scalar "all ended?" is all the host reads).
_MIN_ROWS_DIVISOR = 4
# With compaction, a cache length's steps run in segments of at most this
# many steps, the host checking for ended rows after each (one sync and a
# segment launch: ~1% of 8 steps of 64 rows here); the segment's stop is a
# traced argument, so they share the cache length's program. The rows that
# end early in a batch stop costing within 8 steps, not at the next growth
# of the cache (16, 32, 64, ...), as CTranslate2 drops them at every step.
COMPACT_EVERY = 8


def compacted_rows(alive: int, rows: int, first_rows: int) -> int:
  """The batch size the next segment runs at: ``rows`` halved while the
  ``alive`` rows still fit and the size stays >= first_rows / 4."""
  least = max(1, -(-first_rows // _MIN_ROWS_DIVISOR))
  while rows // 2 >= max(alive, 1) and rows // 2 >= least:
    rows //= 2
  return rows


@functools.partial(jax.jit, static_argnames=("beam_size",))
def _take_rows(state, src, keep, *, beam_size: int):
  """The state and src of the sentences ``keep`` (int32 [n], in order).

  Leaves lead with the sentences ([batch, ...]) or with their beams
  ([batch * beam_size, ...], row-major); the scalar step is shared.
  """
  batch = src.shape[0]
  flat = (keep[:, None] * beam_size + jnp.arange(beam_size)).reshape(-1)

  def take(x):
    if x.ndim == 0:
      return x
    if x.shape[0] == batch:
      return x[keep]
    if x.shape[0] == batch * beam_size:
      return x[flat]
    raise ValueError(f"a search state leaf of shape {x.shape} leads with "
                     f"neither {batch} sentences nor their beams")
  return jax.tree_util.tree_map(take, state), src[keep]


def _put_rows(full, part, rows, batch: int):
  """Host copies: full (dict of numpy [batch, ...], or None) with its rows
  ``rows`` set from part (arrays [len(rows), ...])."""
  part = {k: np.asarray(x) for k, x in part.items()}
  if full is None:
    full = {k: np.zeros((batch,) + x.shape[1:], x.dtype)
            for k, x in part.items()}
  for k, x in part.items():
    full[k][rows] = x
  return full


def _run_segments(start, segment, rows_done, src, outputs,
                  max_decode_len: int, grow: bool, compact: bool,
                  beam_size: int = 1, compact_every: int = COMPACT_EVERY):
  """Runs a search segment by segment over growing caches.

  start(cache_len) -> state (with a ``cache``); segment(state, src, stop) ->
  state, run to step ``stop`` or the end of its cache's room, or fewer steps
  if every row ends; rows_done(state) -> bool [rows]: the rows whose search
  has ended (their state no longer changes). Between segments the host
  reads rows_done (one sync a segment), grows the caches and, with
  ``compact``, drops ended rows (``compacted_rows``): a step then costs the
  rows still decoding, not the batch. With ``compact`` a cache length's
  steps run in segments of ``compact_every`` steps (0: one segment per
  cache length). Returns {name: state[name] for name in outputs}, each
  [batch, ...] in src's row order. Where rows were dropped, each row's last
  state is gathered on the host (where a multi-host search's replicated
  outputs are read anyway) and the result is a new array on the default
  device.
  """
  if compact_every < 0:
    raise ValueError(f"compact_every must be >= 0, got {compact_every}")
  lengths = cache_lengths(max_decode_len, grow)
  batch = src.shape[0]
  rows = np.arange(batch)   # the src row of each row of state
  full = None               # outputs of rows dropped so far
  state, step = start(lengths[0]), 0
  # Under an outer jax.jit nothing can be read between segments: one
  # segment per cache length, which works while there is only one.
  traced = isinstance(state["step"], jax.core.Tracer)
  if traced and len(lengths) > 1:
    raise ValueError("a search over growing caches decides between its "
                     "segments on the host; under jax.jit pass "
                     "grow_cache=False")
  compact = compact and grow and not traced and jax.process_count() == 1
  every = compact_every if compact else 0
  for i, length in enumerate(lengths):
    if i:
      state = dict(state, cache=_grow_cache(state["cache"], length))
    while step < length:
      step = min(length, step + every) if every else length
      state = segment(state, src, np.int32(step))
      if step >= max_decode_len:  # every row has reached its limit
        break
      done = rows_done(state)
      if compact:
        done = np.asarray(done)
      if bool(done.all()):
        return _gathered(full, state, outputs, rows, batch)
      if not compact:
        continue
      alive = int((~done).sum())
      size = compacted_rows(alive, len(rows), batch)
      if size < len(rows):
        full = _put_rows(full, {k: state[k] for k in outputs}, rows, batch)
        ended = np.flatnonzero(done)[:size - alive]  # padding, if any
        keep = np.sort(np.concatenate([np.flatnonzero(~done), ended]))
        state, src = _take_rows(state, src, keep.astype(np.int32),
                                beam_size=beam_size)
        rows = rows[keep]
  return _gathered(full, state, outputs, rows, batch)


def _gathered(full, state, outputs, rows, batch: int):
  """{name: [batch, ...]}: state's outputs, with the rows dropped earlier
  (``full``, host copies, or None) put back in src's row order."""
  last = {k: state[k] for k in outputs}
  if full is None:
    return last
  return {k: jnp.asarray(x) for k, x in _put_rows(full, last, rows,
                                                   batch).items()}


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


# --------------------------------------------------------------------------
# Sampling filters
# --------------------------------------------------------------------------

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


# --------------------------------------------------------------------------
# Greedy search and sampling: one hypothesis per row
# --------------------------------------------------------------------------

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


def _one_hypothesis_loop(config, params, src, choose: Callable, knobs,
                         max_extra_len: int, use_cache: bool,
                         grow_cache: bool, compact_rows: bool,
                         compact_every: int = COMPACT_EVERY):
  """Token-by-token decoding: int32 [batch, max_decode_len]."""
  max_decode_len = _max_decode_len(config, src, max_extra_len)
  encoded, cross = _encode_for_search(config, params, src,
                                      encoder_len=encoder_length(src))
  out = _run_segments(
      lambda cache_len: _one_hypothesis_start(
          config, params, src, encoded, cross, cache_len=cache_len,
          max_extra_len=max_extra_len, use_cache=use_cache),
      lambda state, src, stop: _one_hypothesis_segment(
          config, params, src, state, knobs, stop, choose=choose,
          use_cache=use_cache),
      lambda state: state["finished"], src, ("seqs",),
      max_decode_len, grow_cache and use_cache, compact_rows,
      compact_every=compact_every)
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
                  compact_every: int = COMPACT_EVERY):
  """Argmax decoding: int32 [batch, max_decode_len] (see module docstring).

  use_cache=False recomputes the decoder over the whole prefix at each step
  (same tokens, much slower): the reference the cache is measured against.
  grow_cache=False: one loop over a cache of the whole limit (jittable).
  compact_rows=False keeps ended rows in the batch to the end (the same
  tokens, see the module docstring and ``compacted_rows``); compact_every:
  the steps between checks for ended rows (0: only where the cache grows).
  """
  src = jnp.asarray(src, jnp.int32)
  return _one_hypothesis_loop(config, params, src, _argmax, None,
                              max_extra_len, use_cache, grow_cache,
                              compact_rows, compact_every)


def sample(config: TransformerConfig, params, src, rng, *,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           max_extra_len: int = 50, grow_cache: bool = True):
  """Ancestral sampling with temperature, top-k, top-p (that order), seeded.

  rng: a jax.random key; the same key gives the same output. Step i draws
  with ``fold_in(rng, i)``. Returns int32 [batch, max_decode_len] (see the
  module docstring). grow_cache=False: one loop over a cache of the whole
  limit (jittable). The batch keeps its ended rows to the end: each step
  draws for the whole batch at once, so dropping rows would change the
  draws of the others.
  """
  _check_knobs(temperature, top_k, top_p)
  knobs = (rng, jnp.float32(temperature), jnp.int32(top_k),
           jnp.float32(top_p))
  return _one_hypothesis_loop(config, params, jnp.asarray(src, jnp.int32),
                              _draw, knobs, max_extra_len, True, grow_cache,
                              compact_rows=False)


# --------------------------------------------------------------------------
# Beam search
# --------------------------------------------------------------------------

# The candidates of a beam step are cut into blocks of this many.
_TOP_K_BLOCK = 128


def top_k(x, k: int, block: int = _TOP_K_BLOCK):
  """``lax.top_k(x, k)`` over the last axis of x [rows, n]: the same values
  and indices, ties to the lower index.

  In two small steps: the k blocks (of ``block`` entries) with the largest
  maxima, then the top k of their entries. The top k entries lie in those
  blocks: a block left out has k chosen blocks ranked above it, whose
  maxima outrank each of its entries (ties: a chosen block of an equal
  maximum has the lower indices), and the chosen blocks are read in index
  order, so ties resolve as lax.top_k's do. Written out because XLA's CPU
  TopK over beam search's beam x vocabulary candidates is slow: on [64,
  32000] (4 beams x 8000) with k = 8, 3.0-4.8 ms against 0.8-0.9 ms this
  way, measured.
  """
  rows, n = x.shape
  num_blocks = -(-n // block)
  if num_blocks <= k:
    return lax.top_k(x, k)
  if num_blocks * block != n:   # -inf padding, after every real entry
    x = jnp.pad(x, ((0, 0), (0, num_blocks * block - n)),
                constant_values=NEG_INF)
  blocks = x.reshape(rows, num_blocks, block)
  _, chosen = lax.top_k(jnp.max(blocks, axis=2), k)
  chosen = jnp.sort(chosen, axis=1)
  candidates = jnp.take_along_axis(blocks, chosen[:, :, None], axis=1)
  values, position = lax.top_k(candidates.reshape(rows, k * block), k)
  index = (jnp.take_along_axis(chosen, position // block, axis=1) * block
           + position % block)
  return values, index


class BeamSearchResult(NamedTuple):
  sequences: jax.Array  # int32 [batch, beam, max_decode_len], best first
  scores: jax.Array     # float32 [batch, beam]: log P / length_penalty


def _gather_beams(x, beam_indices):
  """x [batch, beams, ...], beam_indices int [batch, n] -> [batch, n, ...]."""
  return jax.vmap(lambda row, idx: row[idx])(x, beam_indices)


def _keep_slots(parent, beam_size: int):
  """Where the new hypotheses go: each in its parent's slot if it is the
  parent's first (most probable) child, the others in the slots whose
  hypotheses left no child.

  parent: int [batch, beam_size], the slot of the parent of each new
  hypothesis (best first). Returns (slot, copied): each new hypothesis'
  slot, and bool [batch, beam_size], whether its history has to be copied
  there from its parent's slot (it is not its parent's first child). The
  slots copied to are never copied from.
  """
  same = parent[:, :, None] == parent[:, None, :]               # [b, k, j]
  earlier = jnp.arange(beam_size)[None, :] < jnp.arange(beam_size)[:, None]
  copied = jnp.any(same & earlier, axis=2)       # a sibling came before it
  claimed = jnp.any((parent[:, :, None] == jnp.arange(beam_size)) &
                    ~copied[:, :, None], axis=1)                 # [b, slot]
  free = jnp.argsort(claimed, axis=1, stable=True)   # unclaimed slots first
  rank = jnp.clip(jnp.cumsum(copied, axis=1) - 1, 0, beam_size - 1)
  slot = jnp.where(copied, jnp.take_along_axis(free, rank, axis=1), parent)
  return slot, copied


_SELF_ATTENTION_LEAVES = ("cached_key", "cached_value")
# Histories are copied this many rows at a time: a gather and a scatter per
# block and layer, where a slice and an update per row paid a loop
# iteration's overhead per row (61 rows of a [256, 4, 64, 48] cache in six
# leaves: 2.9 ms in blocks of 16 against 4.8 ms row by row, measured).
_COPY_BLOCK = 16


def _copy_histories(cache, parent, slot, copied, beam_size: int):
  """The self-attention caches with each copied hypothesis' history (its
  parent's keys and values, [heads, cache_len, head_dim] in every layer)
  moved into its slot, in place, ``_COPY_BLOCK`` rows at a time.

  Beam search's hypotheses keep their parents' slots where they can
  (``_keep_slots``), so this moves the rows of the second and later
  children only (24% of the live hypotheses on the bible_es_en test split,
  beam 4), where gathering the whole cache to follow the beams rewrote
  every row of every layer at every step (30% of beam search's time).
  No slot is both copied to and copied from, so the blocks' order and
  their rows' order do not matter.
  """
  batch = parent.shape[0]
  rows = batch * beam_size
  block = min(_COPY_BLOCK, rows)
  blocks = -(-rows // block)
  base = jnp.arange(batch)[:, None] * beam_size
  order = jnp.argsort(~copied.reshape(-1), stable=True)     # copies first
  padding = blocks * block - rows
  sources = jnp.pad((base + parent).reshape(-1)[order], (0, padding))
  targets = jnp.pad((base + slot).reshape(-1)[order], (0, padding))
  count = jnp.sum(copied)

  def move(j, cache):
    start = j * block
    source = lax.dynamic_slice_in_dim(sources, start, block)
    # The block's rows past the last copy go out of range (each to its
    # own index, as unique_indices promises): dropped.
    lanes = jnp.arange(block)
    target = jnp.where(start + lanes < count,
                       lax.dynamic_slice_in_dim(targets, start, block),
                       rows + lanes)

    def one(path, x):
      if path[-1].key not in _SELF_ATTENTION_LEAVES:
        return x
      return x.at[target].set(x[source], mode="drop", unique_indices=True)
    return jax.tree_util.tree_map_with_path(one, cache)
  with jax.named_scope("copy_histories"):   # named in profiles
    return lax.fori_loop(0, -(-count // block), move, cache)


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


@functools.partial(jax.jit, static_argnames=("config", "beam_size"),
                   donate_argnames=("state",))
def _beam_segment(config, params, src, state, alpha, stop, *,
                  beam_size: int):
  """Until step ``stop`` (int32 scalar), the end of the cache's room, or
  every row is done.

  alpha: a traced float32, so every length penalty shares one compilation.
  """
  batch = src.shape[0]
  vocab = config.output_vocab_size
  end = jnp.minimum(stop, _cache_len(state["cache"]))
  encoded, limits = state["encoded"], state["limits"]
  flat_src = jnp.repeat(src, beam_size, axis=0)

  def cond(state):
    return (state["step"] < end) & ~jnp.all(_rows_done(state, beam_size))

  def body(state):
    step, alive_seqs = state["step"], state["alive_seqs"]
    fed = lax.dynamic_index_in_dim(alive_seqs, step, axis=2, keepdims=False)
    logits, cache = _cached_step(config, params, encoded, flat_src,
                                 fed.reshape(-1), state["cache"])
    log_probs = _forbid_empty_output(
        jax.nn.log_softmax(_mask_pad(logits)).reshape(batch, beam_size, vocab),
        step, src)
    # At its length limit a hypothesis can only end.
    at_limit = (step + 1 >= limits)[:, None, None]
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
    is_eos = token == EOS_ID

    # Finished: eos extensions among the k best, unless the row had stopped.
    stopped = _rows_done(state, beam_size)[:, None]
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
    num_finished = state["num_finished"] + jnp.sum(newly_finished, axis=1)

    # Alive: the k best non-eos extensions, each put in a slot
    # (``_keep_slots``): the slots, not their order, hold the beam.
    alive_log_probs, pick = lax.top_k(
        jnp.where(is_eos, NEG_INF, top_log_probs), beam_size)
    parent = jnp.take_along_axis(parent, pick, axis=1)
    slot, copied = _keep_slots(parent, beam_size)
    in_slot = jnp.argsort(slot, axis=1)   # the new hypothesis of each slot
    cache = _copy_histories(cache, parent, slot, copied & ~stopped,
                            beam_size)
    return dict(state, step=step + 1,
                alive_seqs=_gather_beams(
                    top_seqs, jnp.take_along_axis(pick, in_slot, axis=1)),
                alive_log_probs=jnp.take_along_axis(alive_log_probs, in_slot,
                                                    axis=1),
                finished_seqs=finished_seqs, finished_scores=finished_scores,
                num_finished=num_finished, cache=cache)

  return lax.while_loop(cond, body, state)


def beam_search(config: TransformerConfig, params, src, *, beam_size: int = 4,
                alpha: float = 0.6, max_extra_len: int = 50,
                grow_cache: bool = True, compact_rows: bool = True,
                compact_every: int = COMPACT_EVERY) -> BeamSearchResult:
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
  is an exhaustive search. grow_cache=False: one loop over a cache of the
  whole limit (jittable). compact_rows=False keeps the sentences that have
  ended in the batch to the end (the same result, see the module docstring
  and ``compacted_rows``); compact_every: the steps between checks for
  ended sentences (0: only where the cache grows).

  Returns sequences [batch, beam, max_decode_len] and their scores
  [batch, beam], best first (the first is the translation). Slots of rows
  with fewer than ``beam_size`` finished hypotheses score -inf.
  """
  if beam_size < 1:
    raise ValueError(f"beam_size must be >= 1, got {beam_size}")
  src = jnp.asarray(src, jnp.int32)
  max_decode_len = _max_decode_len(config, src, max_extra_len)
  encoded, cross = _encode_for_search(config, params, src,
                                      encoder_len=encoder_length(src))
  out = _run_segments(
      lambda cache_len: _beam_start(config, params, src, encoded, cross,
                                    beam_size=beam_size, cache_len=cache_len,
                                    max_extra_len=max_extra_len),
      lambda state, src, stop: _beam_segment(config, params, src, state,
                                             jnp.float32(alpha), stop,
                                             beam_size=beam_size),
      lambda state: _rows_done(state, beam_size), src,
      ("finished_seqs", "finished_scores"), max_decode_len, grow_cache,
      compact_rows, beam_size, compact_every)
  # Every row has at least one finished hypothesis: the limit forces eos.
  return BeamSearchResult(out["finished_seqs"][:, :, 1:],
                          out["finished_scores"])


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
