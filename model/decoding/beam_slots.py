"""Beam search's bookkeeping: the best of a step's candidates, the slots the
new hypotheses take, and their histories moved into those slots."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from .cache import _SELF_ATTENTION_CACHE
from .core import NEG_INF


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
      if path[-1].key not in _SELF_ATTENTION_CACHE:
        return x
      return x.at[target].set(x[source], mode="drop", unique_indices=True)
    return jax.tree_util.tree_map_with_path(one, cache)
  with jax.named_scope("copy_histories"):   # named in profiles
    return lax.fori_loop(0, -(-count // block), move, cache)



def _gather_histories(cache, parent, slot, copied, beam_size: int):
  """``_copy_histories``' result as one gather of every row of the
  self-attention caches: each slot takes its new hypothesis' parent's rows
  where that hypothesis is ``copied``, its own elsewhere.

  The device mode's form, with no loop: an accelerator reads a whole cache
  fast, while each iteration of a loop of unknown trip count costs it a
  launch (on a GPU, a copy of the loop's condition to the host). Flax's
  examples/wmt and T5X follow their beams by gathering the cache the same
  way.
  """
  batch = parent.shape[0]
  sentence = jnp.arange(batch)[:, None]
  source = jnp.broadcast_to(jnp.arange(beam_size), (batch, beam_size))
  source = source.at[sentence, slot].set(jnp.where(copied, parent, slot))
  flat = (sentence * beam_size + source).reshape(-1)

  def one(path, x):
    if path[-1].key not in _SELF_ATTENTION_CACHE:
      return x
    return x[flat]
  return jax.tree_util.tree_map_with_path(one, cache)
