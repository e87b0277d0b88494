"""Inference: KV-cached greedy search, beam search and sampling.

Every search is batched and feeds one token per step through the decoder's
key/value cache (``Transformer(config, use_cache=True)``); the encoder runs
once per batch. Each search is a strategy over one shared loop
(``segments``), which runs in one of two modes (``mode=``):

  * "host", a CPU's default: the steps run in jitted ``lax.while_loop``
    segments over a self-attention cache that grows to the filled length
    (``cache_lengths``: 16, 32, 64, ... tokens, then the batch's limit), as
    CTranslate2's does: a step attends over (and beam search copies) the
    positions that exist, not the batch's whole limit; a batch stops at the
    step its last row ends, and no later segment is launched. Between
    segments, greedy and beam search also drop the rows (sentences) whose
    search has ended once at most half are still decoding
    (``compacted_rows``; ``compact_rows=False`` keeps them), checking every
    ``COMPACT_EVERY`` steps: the long tail of a batch then runs at a half or
    a quarter of its rows. ``grow_cache=False`` runs one segment over the
    whole limit: the same tokens, in one loop that an outer ``jax.jit`` can
    trace (the default reads each row's "ended?" on the host between
    segments).
  * "device", the default wherever ``jax.default_backend()`` is not "cpu":
    the whole search (encoder, cache allocated once at the batch's limit,
    one ``lax.while_loop``) is one jitted program, as Flax's examples/wmt
    and T5X decode: no host read inside a search, one compiled program per
    (batch shape, method), the results read once. Beam search follows its
    beams there by one gather of the cache rather than a loop of copies.

The tokens of every mode are those of the whole batch in one loop as long
as a matmul's rows do not depend on how many rows it has (measured
identical on this CPU; other kernels may round differently).

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

Files: ``core`` (lengths, the encoder, one decoder step, output rules),
``cache`` (cache lengths), ``segments`` (the shared loop and its modes),
``filters`` (sampling's filters), ``greedy`` (greedy search and sampling),
``beam`` and ``beam_slots`` (beam search and its bookkeeping).

Public functions: ``greedy_search``, ``beam_search``, ``sample``,
``filter_logits``, ``sample_token``, ``length_penalty``, ``decode_limits``,
``cache_lengths``, ``compacted_rows``, ``encoder_length``, ``top_k``,
``search_mode``, ``strip_special``.
"""

# Relative imports: benchmarks.decode_ab loads another checkout's copy of
# this package under another name, whose modules must import each other.
from . import beam, beam_slots, cache, core, filters, greedy, segments
from .beam import BeamSearchResult, beam_search
# Private, read by tests of the beam's history copies.
from .beam_slots import _COPY_BLOCK, _copy_histories, _keep_slots, top_k
from .cache import FIRST_CACHE_LEN, cache_lengths
from .core import (ENCODER_LENGTH_MULTIPLE, NEG_INF, decode_limits,
                   encoder_length, length_penalty, strip_special)
from .filters import filter_logits, sample_token
from .greedy import greedy_search, sample
from .segments import (COMPACT_EVERY, MODES, Search, compacted_rows,
                       run_one_loop, run_segments, search_mode)
