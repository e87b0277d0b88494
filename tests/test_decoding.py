"""Tests of model/decoding/: greedy, beam search, sampling, the KV cache."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from model import EOS_ID, PAD_ID, Transformer, TransformerConfig, init_params
from model import decoding

# One layer each way keeps compilation (the cost of these tests) short.
CONFIG = TransformerConfig.preset("tiny", num_encoder_layers=1,
                                  num_decoder_layers=1, dropout_rate=0.0)


def _peaky_params(config, seed):
  """Random params with larger embeddings: peakier, more varied outputs."""
  params = jax.jit(init_params, static_argnums=0)(config, jax.random.key(seed))
  emb = params["shared_embedding"]["embedding"]
  params["shared_embedding"]["embedding"] = emb * 4.0
  return params


@pytest.fixture(scope="module")
def params():
  return _peaky_params(CONFIG, 0)


@pytest.fixture(scope="module")
def src():
  rng = np.random.RandomState(0)
  src = rng.randint(2, CONFIG.vocab_size, size=(4, 9))
  src[0, -1] = EOS_ID
  src[1, 5:] = PAD_ID   # a shorter row: a shorter length limit
  src[1, 4] = EOS_ID
  src[2, 2:] = PAD_ID
  return jnp.asarray(src, jnp.int32)


def _check_well_formed(tokens, src, max_extra_len):
  tokens = np.asarray(tokens)
  src_lengths = np.sum(np.asarray(src) != PAD_ID, axis=1)
  for row, limit in zip(tokens, src_lengths + max_extra_len):
    eos = np.flatnonzero(row == EOS_ID)
    assert eos.size, "every output ends with eos"
    end = eos[0]
    assert end < limit, "output longer than source length + max_extra_len"
    assert np.all(row[:end] > EOS_ID) and np.all(row[end + 1:] == PAD_ID)


# --- sampling filters (no model) -------------------------------------------

def test_top_p_textbook_example_keeps_first_three():
  probs = np.array([0.40, 0.30, 0.15, 0.10, 0.05])
  order = np.array([3, 0, 4, 1, 2])  # shuffled: must not depend on position
  logits = jnp.log(jnp.asarray(probs[order], jnp.float32))
  kept = np.isfinite(np.asarray(decoding.filter_logits(logits, top_p=0.85)))
  np.testing.assert_array_equal(kept, probs[order] >= 0.15)
  assert kept.sum() == 3


def test_top_k_one_and_tiny_temperature_give_argmax():
  logits = jax.random.normal(jax.random.key(1), (64, 50)) * 3.0
  argmax = np.asarray(jnp.argmax(logits, -1))
  for kwargs in (dict(top_k=1), dict(temperature=1e-4)):
    for seed in range(3):
      tokens = decoding.sample_token(jax.random.key(seed), logits, **kwargs)
      np.testing.assert_array_equal(np.asarray(tokens), argmax)


def test_sampled_frequencies_match_filtered_distribution():
  temperature, top_k, top_p = 0.8, 6, 0.8
  logits = np.array([2.0, 1.5, 1.2, 1.0, 0.3, 0.1, -0.5, -1.0], np.float32)
  # The reference: temperature, then top-k, then top-p, in NumPy.
  z = logits.astype(np.float64) / temperature
  z[np.argsort(-z)[top_k:]] = -np.inf
  p = np.exp(z - z.max())
  p /= p.sum()
  order = np.argsort(-p)
  mass_before = np.cumsum(p[order]) - p[order]
  support = order[mass_before < top_p]
  expected = np.zeros_like(p)
  expected[support] = p[support] / p[support].sum()
  assert 1 < len(support) < top_k  # both filters remove something here

  draws = 40_000
  tokens = decoding.sample_token(
      jax.random.key(1234), jnp.broadcast_to(jnp.asarray(logits),
                                             (draws, logits.size)),
      temperature=temperature, top_k=top_k, top_p=top_p)
  counts = np.bincount(np.asarray(tokens), minlength=logits.size)
  assert counts[expected == 0].sum() == 0, "sampled a filtered-out token"
  chi2 = stats.chisquare(counts[support], expected[support] * draws)
  assert chi2.pvalue > 1e-3, (counts, expected * draws)


def test_block_top_k_equals_a_stable_sort():
  # The reference: numpy's stable sort, largest first, ties to the lower
  # index (lax.top_k's order). Rows of ties, of -inf but a few entries (a
  # beam step at its length limit), a width that is not a whole number of
  # blocks, and one of fewer blocks than k.
  rng = np.random.default_rng(0)
  for n, block, k in ((32000, 128, 8), (1000, 64, 6), (300, 128, 8),
                      (50, 16, 4)):
    x = rng.standard_normal((6, n)).astype(np.float32)
    x[1] = np.round(x[1] * 2) / 2
    x[2] = -np.inf
    x[2, [1, n // 4 + 1, n // 2 + 1]] = [-3.0, -1.0, -3.0]
    x[3] = -np.inf
    x[4, :] = 0.5
    values, index = jax.jit(decoding.top_k, static_argnums=(1, 2))(
        jnp.asarray(x), k, block)
    want = np.argsort(-x, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(np.asarray(index), want)
    np.testing.assert_array_equal(np.asarray(values),
                                  np.take_along_axis(x, want, axis=1))


def test_filter_rejects_bad_knobs():
  with pytest.raises(ValueError, match="temperature"):
    decoding.filter_logits(jnp.zeros(4), temperature=0.0)
  with pytest.raises(ValueError, match="top_p"):
    decoding.filter_logits(jnp.zeros(4), top_p=1.5)


# --- searches on a random model --------------------------------------------

def test_beam_size_one_equals_greedy(params, src):
  greedy = decoding.greedy_search(CONFIG, params, src, max_extra_len=6)
  beam = decoding.beam_search(CONFIG, params, src, beam_size=1,
                              max_extra_len=6)
  _check_well_formed(greedy, src, 6)
  np.testing.assert_array_equal(np.asarray(beam.sequences[:, 0]),
                                np.asarray(greedy))


def test_cached_decoding_equals_recomputing_the_prefix(params, src):
  cached = decoding.greedy_search(CONFIG, params, src, max_extra_len=6)
  recomputed = decoding.greedy_search(CONFIG, params, src, max_extra_len=6,
                                      use_cache=False)
  np.testing.assert_array_equal(np.asarray(cached), np.asarray(recomputed))


def test_sampling_is_seeded_and_top_k_one_is_greedy(params, src):
  greedy = decoding.greedy_search(CONFIG, params, src, max_extra_len=6)
  greedy_by_sampling = decoding.sample(CONFIG, params, src, jax.random.key(7),
                                       top_k=1, max_extra_len=6)
  np.testing.assert_array_equal(np.asarray(greedy_by_sampling),
                                np.asarray(greedy))
  a, b, c = (decoding.sample(CONFIG, params, src, jax.random.key(seed),
                             max_extra_len=6) for seed in (3, 3, 4))
  _check_well_formed(a, src, 6)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(np.asarray(a), np.asarray(c))


def _enumerated_scores(config, params, src_row, limit, alpha):
  """{sequence: log P / lp} for every output of at most `limit` tokens (not
  the empty one, if the source is non-empty: more than one token)."""
  real_tokens = range(EOS_ID + 1, config.vocab_size)
  shortest = 1 if int(np.sum(np.asarray(src_row) != PAD_ID)) > 1 else 0
  seqs = [prefix + (EOS_ID,) for length in range(shortest, limit)
          for prefix in itertools.product(real_tokens, repeat=length)]
  # One teacher-forced batch, padded after eos (causality keeps the padding
  # out of the real positions).
  tgt = np.full((len(seqs), limit), PAD_ID, np.int32)
  for i, seq in enumerate(seqs):
    tgt[i, :len(seq)] = seq
  src = jnp.broadcast_to(src_row, (len(seqs), src_row.shape[0]))
  logits = jax.jit(Transformer(config).apply)({"params": params}, src, tgt)
  log_probs = jax.nn.log_softmax(logits.at[..., PAD_ID].set(-jnp.inf))
  token_log_probs = np.take_along_axis(np.asarray(log_probs),
                                       tgt[..., None], -1)[..., 0]
  return {seq: token_log_probs[i, :len(seq)].sum() /
               decoding.length_penalty(len(seq), alpha)
          for i, seq in enumerate(seqs)}


def test_wide_beam_finds_the_best_of_all_sequences():
  # 3 real tokens + eos; outputs of at most 4 tokens: 1 + 3 + 9 + 27 = 40.
  config = TransformerConfig(vocab_size=5, d_model=16, num_heads=2, d_ff=32,
                             num_encoder_layers=1, num_decoder_layers=1,
                             max_len=16, dropout_rate=0.0)
  params = _peaky_params(config, 3)
  alpha, max_extra_len, beam_size = 0.6, 2, 40
  # Source lengths 2 and 1: limits of 4 and 3 output tokens.
  src = jnp.asarray([[3, 2, PAD_ID, PAD_ID], [4, PAD_ID, PAD_ID, PAD_ID]],
                    jnp.int32)
  limits = [4, 3]
  result = decoding.beam_search(config, params, src, beam_size=beam_size,
                                alpha=alpha, max_extra_len=max_extra_len)
  for row in range(2):
    scores = _enumerated_scores(config, params, src[row], limits[row], alpha)
    ranked = sorted(scores.items(), key=lambda item: -item[1])
    best_seq, best_score = ranked[0]
    found = np.asarray(result.sequences[row, 0])
    assert tuple(found[:len(best_seq)]) == best_seq
    assert np.all(found[len(best_seq):] == PAD_ID)
    # The beam held every sequence: its finished list is the whole ranking.
    found_scores = np.asarray(result.scores[row])
    np.testing.assert_allclose(found_scores[:len(ranked)],
                               [s for _, s in ranked], rtol=1e-5, atol=1e-5)
    assert np.all(found_scores[len(ranked):] == -np.inf)
    empty_allowed = row == 1   # a one-token source counts as empty
    assert len(scores) == sum(3 ** n for n in range(limits[row])) - (
        0 if empty_allowed else 1)


def _eos_loving_params():
  """A model that always wants to stop: the last post-LN LayerNorm outputs
  its bias alone (scale 0), set to a long eos embedding, so the tied output
  layer scores eos far above every other token at every step."""
  params = _peaky_params(CONFIG, 5)
  emb = params["shared_embedding"]["embedding"]
  emb = emb.at[EOS_ID].multiply(10.0)
  params["shared_embedding"]["embedding"] = emb
  norm = params["decoder"]["layers_0"]["ffn_norm"]
  norm["scale"] = jnp.zeros_like(norm["scale"])
  norm["bias"] = emb[EOS_ID]
  return params


def test_no_empty_translation_of_a_non_empty_source():
  params = _eos_loving_params()
  src = jnp.asarray([[7, 9, EOS_ID, PAD_ID],      # "Fin." and the like
                     [EOS_ID, PAD_ID, PAD_ID, PAD_ID]], jnp.int32)  # empty
  logits = Transformer(CONFIG).apply({"params": params}, src,
                                     jnp.full((2, 1), EOS_ID, jnp.int32))
  first_choice = jnp.argmax(logits[:, 0].at[:, PAD_ID].set(-jnp.inf), -1)
  assert np.all(np.asarray(first_choice) == EOS_ID)  # the trap is set
  outputs = {
      "greedy": decoding.greedy_search(CONFIG, params, src, max_extra_len=4),
      "beam": decoding.beam_search(CONFIG, params, src, beam_size=4,
                                   max_extra_len=4).sequences[:, 0],
      "sample": decoding.sample(CONFIG, params, src, jax.random.key(0),
                                max_extra_len=4)}
  for name, tokens in outputs.items():
    ids = decoding.strip_special(tokens)
    assert len(ids[0]) >= 1, name          # the non-empty source: words
    assert ids[1] == [], name              # the empty source: nothing


# --- caches that grow segment by segment -------------------------------------

def test_cache_lengths_double_up_to_the_limit():
  assert decoding.cache_lengths(10) == [10]
  assert decoding.cache_lengths(16) == [16]
  assert decoding.cache_lengths(17) == [16, 17]
  assert decoding.cache_lengths(114) == [16, 32, 64, 114]
  assert decoding.cache_lengths(128) == [16, 32, 64, 128]
  assert decoding.cache_lengths(114, grow=False) == [114]


def _counting_grows(monkeypatch):
  """Counts the calls of _grow_cache (one per segment after the first) by
  the shared loop (decoding.segments)."""
  calls = []
  grow = decoding.segments._grow_cache
  def counted(cache, length):
    calls.append(length)
    return grow(cache, length)
  monkeypatch.setattr(decoding.segments, "_grow_cache", counted)
  return calls


def test_growing_caches_give_the_tokens_of_one_full_length_loop(
    params, src, monkeypatch):
  # Limits of 9 + 30 tokens: segments of 16, 32 and 39 positions. The tiny
  # random model seldom ends early, so every segment runs.
  extra = 30
  grows = _counting_grows(monkeypatch)
  grown = decoding.greedy_search(CONFIG, params, src, max_extra_len=extra)
  assert grows == [32, 39]
  _check_well_formed(grown, src, extra)
  assert np.asarray(grown).shape[1] == 39
  assert (np.asarray(grown) == EOS_ID).argmax(1).max() >= 32  # 3rd segment
  one_loop = decoding.greedy_search(CONFIG, params, src, max_extra_len=extra,
                                    grow_cache=False)
  recomputed = decoding.greedy_search(CONFIG, params, src, max_extra_len=extra,
                                      use_cache=False)
  np.testing.assert_array_equal(np.asarray(grown), np.asarray(one_loop))
  np.testing.assert_array_equal(np.asarray(grown), np.asarray(recomputed))
  for grow in (True, False):
    beam = decoding.beam_search(CONFIG, params, src, beam_size=3,
                                max_extra_len=extra, grow_cache=grow)
    if grow:
      grown_beam = beam
      _check_well_formed(beam.sequences[:, 0], src, extra)
    else:
      np.testing.assert_array_equal(np.asarray(beam.sequences),
                                    np.asarray(grown_beam.sequences))
      np.testing.assert_allclose(np.asarray(beam.scores),
                                 np.asarray(grown_beam.scores), rtol=1e-6)
  sampled = [decoding.sample(CONFIG, params, src, jax.random.key(1),
                             temperature=0.7, max_extra_len=extra,
                             grow_cache=grow) for grow in (True, False)]
  np.testing.assert_array_equal(np.asarray(sampled[0]),
                                np.asarray(sampled[1]))


def test_a_batch_whose_rows_all_ended_launches_no_later_segment(monkeypatch):
  # A model that ends every row after one token: with a limit of 4 + 40
  # tokens the first segment (16) holds the whole search.
  params = _eos_loving_params()
  src = jnp.asarray([[7, 9, 11, EOS_ID], [5, EOS_ID, PAD_ID, PAD_ID]],
                    jnp.int32)
  grows = _counting_grows(monkeypatch)
  for search in (
      lambda grow: decoding.greedy_search(CONFIG, params, src,
                                          max_extra_len=40, grow_cache=grow),
      lambda grow: decoding.beam_search(CONFIG, params, src, beam_size=2,
                                        max_extra_len=40,
                                        grow_cache=grow).sequences[:, 0]):
    grown = np.asarray(search(True))
    assert grows == []
    np.testing.assert_array_equal(grown, np.asarray(search(False)))
    assert [len(ids) for ids in decoding.strip_special(grown)] == [1, 1]


def test_growing_caches_under_jit_ask_for_one_loop(params, src):
  with pytest.raises(ValueError, match="grow_cache=False"):
    jax.jit(lambda p, s: decoding.greedy_search(CONFIG, p, s,
                                                max_extra_len=30))(params, src)
  # A limit that fits the first cache (16) needs no host read: it jits as it is.
  short = jax.jit(lambda p, s: decoding.greedy_search(CONFIG, p, s[:, :4],
                                                      max_extra_len=10))
  np.testing.assert_array_equal(
      np.asarray(short(params, src)),
      np.asarray(decoding.greedy_search(CONFIG, params, src[:, :4],
                                        max_extra_len=10, grow_cache=False)))
  jitted = jax.jit(lambda p, s: decoding.greedy_search(
      CONFIG, p, s, max_extra_len=30, grow_cache=False))(params, src)
  np.testing.assert_array_equal(
      np.asarray(jitted),
      np.asarray(decoding.greedy_search(CONFIG, params, src, max_extra_len=30)))


def test_compacted_rows_halve_while_the_alive_rows_fit():
  # (alive, rows now, first rows) -> rows of the next segment, by hand:
  # halve while alive <= half, never below a quarter of the first size.
  assert decoding.compacted_rows(40, 64, 64) == 64
  assert decoding.compacted_rows(32, 64, 64) == 32
  assert decoding.compacted_rows(17, 64, 64) == 32
  assert decoding.compacted_rows(16, 64, 64) == 16
  assert decoding.compacted_rows(3, 64, 64) == 16
  assert decoding.compacted_rows(3, 16, 64) == 16
  assert decoding.compacted_rows(2, 8, 8) == 2
  assert decoding.compacted_rows(0, 5, 5) == 2
  assert decoding.compacted_rows(1, 1, 1) == 1


def _random_sources(lengths, seed: int, width: int = 30):
  """Random source rows of the given lengths, PAD_ID after them."""
  rng = np.random.RandomState(seed)
  src = np.full((len(lengths), width), PAD_ID)
  for row, length in enumerate(lengths):
    src[row, :length] = rng.randint(2, CONFIG.vocab_size, size=length)
  return jnp.asarray(src, jnp.int32)


def _record_takes(monkeypatch, record):
  """Calls record(step, kept rows as a list) at every compaction."""
  take = decoding.segments._take_rows
  def counted(state, src, keep, **kw):
    record(int(state["step"]), np.asarray(keep).tolist())
    return take(state, src, keep, **kw)
  monkeypatch.setattr(decoding.segments, "_take_rows", counted)


def test_dropping_ended_rows_gives_the_tokens_of_the_whole_batch(
    params, monkeypatch):
  # Limits (source length + 10): five short rows 13, two middle ones 30,
  # one long one 40, so segments of 16, 32 and 40 positions. After the first
  # the 3 rows still decoding run as a batch of 4 (with the first ended row
  # as padding), after the second the long row as a batch of 2. Every search
  # must give what the whole batch gives, in the batch's row order.
  src = _random_sources([3, 20, 3, 3, 20, 3, 30, 3], seed=3)
  taken = []
  _record_takes(monkeypatch, lambda step, keep: taken.append(keep))
  # Indices into the batch of the moment: rows 1, 4, 6 plus row 0; then
  # that batch's rows 3 (the long row 6) and 0 (row 0 again, padding).
  compactions = [[0, 1, 4, 6], [0, 3]]

  greedy = decoding.greedy_search(CONFIG, params, src, max_extra_len=10)
  assert taken == compactions
  _check_well_formed(greedy, src, 10)
  assert (np.asarray(greedy)[6] == EOS_ID).argmax() >= 32
  np.testing.assert_array_equal(
      np.asarray(greedy),
      np.asarray(decoding.greedy_search(CONFIG, params, src, max_extra_len=10,
                                        compact_rows=False)))
  # (The whole batch's greedy equals recomputing the prefix:
  # test_growing_caches_give_the_tokens_of_one_full_length_loop.)
  beams = [decoding.beam_search(CONFIG, params, src, beam_size=3,
                                max_extra_len=10, compact_rows=compact)
           for compact in (True, False)]
  assert taken == compactions * 2
  np.testing.assert_array_equal(np.asarray(beams[0].sequences),
                                np.asarray(beams[1].sequences))
  np.testing.assert_allclose(np.asarray(beams[0].scores),
                             np.asarray(beams[1].scores), rtol=1e-6)


def test_ended_rows_are_dropped_every_compact_every_steps(params, monkeypatch):
  # Limits (source length + 10): five short rows 13, two middle ones 22, one
  # long one 40; caches of 16, 32 and 40 positions. Checked every 8 steps,
  # the short rows go at step 16 (batch of 4: the three still decoding and
  # row 0 as padding) and the middle ones at step 24, inside the 32-position
  # cache; checked only where the cache grows, the middle ones stay to step
  # 32. Both give the tokens of the whole batch.
  src = _random_sources([3, 12, 3, 3, 12, 3, 30, 3], seed=5)
  taken = []
  _record_takes(monkeypatch, lambda step, keep: taken.append((step, keep)))
  whole = np.asarray(decoding.greedy_search(CONFIG, params, src,
                                            max_extra_len=10,
                                            compact_rows=False))
  ends = [(row == EOS_ID).argmax() + 1 for row in whole]  # tokens with eos
  assert ends == [13, 22, 13, 13, 22, 13, 40, 13]  # each row at its limit
  # Every 5: checks at 5, 10, 15, 16 (the cache grows), 21, 26, ...
  for every, steps in ((8, [16, 24]), (4, [16, 24]), (0, [16, 32]),
                       (5, [15, 26])):
    taken.clear()
    greedy = decoding.greedy_search(CONFIG, params, src, max_extra_len=10,
                                    compact_every=every)
    assert taken == list(zip(steps, [[0, 1, 4, 6], [0, 3]])), every
    np.testing.assert_array_equal(np.asarray(greedy), whole)
  taken.clear()
  beams = [decoding.beam_search(CONFIG, params, src, beam_size=3,
                                max_extra_len=10, compact_rows=compact)
           for compact in (True, False)]
  assert [step for step, _ in taken] == [16, 24]
  np.testing.assert_array_equal(np.asarray(beams[0].sequences),
                                np.asarray(beams[1].sequences))
  np.testing.assert_allclose(np.asarray(beams[0].scores),
                             np.asarray(beams[1].scores), rtol=1e-6)
  with pytest.raises(ValueError, match="compact_every"):
    decoding.greedy_search(CONFIG, params, src, compact_every=-1)


def test_the_encoder_runs_over_the_longest_source_not_the_padding(params,
                                                                 src):
  # src (its longest row 9 tokens) padded to 40 columns, as a length bucket
  # pads a batch: the encoder runs over 16 positions (a multiple of
  # ENCODER_LENGTH_MULTIPLE = 8), its outputs padded back behind the mask.
  # The searches give the tokens (and scores) of src at its own width, where
  # the encoder runs over all 9 columns.
  wide = jnp.pad(src, ((0, 0), (0, 31)), constant_values=PAD_ID)
  assert decoding.ENCODER_LENGTH_MULTIPLE == 8
  assert decoding.encoder_length(wide) == 16
  assert decoding.encoder_length(np.asarray(src)) == 9   # capped by width
  assert decoding.encoder_length(jnp.full((2, 24), PAD_ID)) == 8
  holed = np.asarray(wide).copy()
  holed[0, 5:17] = PAD_ID
  holed[0, 17] = 7          # a token after pads: the encoder reaches it
  assert decoding.encoder_length(holed) == 24
  assert jax.jit(lambda x: jnp.int32(decoding.encoder_length(x)))(wide) == 40
  extra = 12   # limits of source + 12 tokens, below CONFIG.max_len either way
  strip = decoding.strip_special
  assert strip(decoding.greedy_search(CONFIG, params, wide,
                                      max_extra_len=extra)) == strip(
      decoding.greedy_search(CONFIG, params, src, max_extra_len=extra))
  got = decoding.beam_search(CONFIG, params, wide, beam_size=3,
                             max_extra_len=extra)
  want = decoding.beam_search(CONFIG, params, src, beam_size=3,
                              max_extra_len=extra)
  for k in range(3):
    assert strip(got.sequences[:, k]) == strip(want.sequences[:, k])
  np.testing.assert_allclose(np.asarray(got.scores), np.asarray(want.scores),
                             rtol=1e-5)


def test_copy_histories_moves_parents_rows_in_several_blocks():
  # 12 sentences x 4 beams = 48 rows: with random parents more rows are
  # copied than one block (decoding._COPY_BLOCK) holds. Each slot's keys and
  # values must be its hypothesis' parent's, whatever moved; other leaves
  # stay as they were.
  rng = np.random.default_rng(3)
  sentences, beams = 12, 4
  rows = sentences * beams
  parent = rng.integers(0, beams, size=(sentences, beams))
  parent[0] = [1, 1, 1, 1]
  leaf = lambda: rng.standard_normal((rows, 2, 5, 3)).astype(np.float32)
  layer = {"cached_key": leaf(), "cached_value": leaf(),
           "cross_key": leaf()}
  cache = {"decoder": {"layers_0": {"self_attention": layer}}}
  slot, copied = decoding._keep_slots(jnp.asarray(parent), beams)
  slot, copied_np = np.asarray(slot), np.asarray(copied)
  assert copied_np.sum() > decoding._COPY_BLOCK
  out = decoding._copy_histories(jax.tree.map(jnp.asarray, cache),
                                 jnp.asarray(parent), jnp.asarray(slot),
                                 copied, beams)
  out = out["decoder"]["layers_0"]["self_attention"]
  for name in ("cached_key", "cached_value"):
    want = layer[name].copy()
    for b in range(sentences):
      for k in range(beams):
        want[b * beams + slot[b, k]] = layer[name][b * beams + parent[b, k]]
    np.testing.assert_array_equal(np.asarray(out[name]), want)
  np.testing.assert_array_equal(np.asarray(out["cross_key"]),
                                layer["cross_key"])
