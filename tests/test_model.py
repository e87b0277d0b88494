"""The model against the paper: shapes, masks, packing, cache, equations."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import (ConfigError, Transformer, TransformerConfig,
                   attention_weights, init_cache, init_params)
from model import decoding
from model.transformer import DecoderLayer, EncoderLayer, cross_attention_cache

TINY = TransformerConfig.preset("tiny")


@pytest.fixture(scope="module")
def params():
  return init_params(TINY, jax.random.key(0))


@functools.partial(jax.jit, static_argnames=("cfg",))
def _jitted_logits(params, src, tgt, cfg, **kw):
  return Transformer(cfg).apply({"params": params}, src, tgt, **kw)


def logits_of(params, src, tgt, cfg=TINY, **kw):
  return np.asarray(_jitted_logits(params, jnp.asarray(src), jnp.asarray(tgt),
                                   cfg, **kw))


def random_tokens(rng, shape, cfg=TINY):
  # Real ids start after the special ids pad=0, eos=1.
  return rng.integers(2, cfg.vocab_size, size=shape).astype(np.int32)


def num_params(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------- config ---

def closed_form_count(V, d, d_ff, N, attention_bias=False, pre_ln=False):
  attention = 4 * d * d + (4 * d if attention_bias else 0)  # W^Q,K,V,O (+ b)
  ffn = (d * d_ff + d_ff) + (d_ff * d + d)       # W1, b1, W2, b2
  layer_norm = 2 * d                             # gain and bias
  encoder_layer = attention + ffn + 2 * layer_norm
  decoder_layer = 2 * attention + ffn + 3 * layer_norm
  final_norms = 2 * layer_norm if pre_ln else 0  # one per stack
  return V * d + N * encoder_layer + N * decoder_layer + final_norms


@pytest.mark.parametrize("preset, changes, expected", [
    ("base", {}, 63_045_632),                     # the paper's: no biases
    ("base", {"attention_bias": True}, 63_082_496),
    ("small", {}, 7_568_384),
    ("small", {"pre_ln": True}, 7_569_408),       # + two final LayerNorms
    ("tiny", {}, 44_032),
])
def test_parameter_count_matches_closed_form(preset, changes, expected):
  cfg = TransformerConfig.preset(preset, **changes)
  shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  assert cfg.num_encoder_layers == cfg.num_decoder_layers
  assert num_params(shapes) == expected == closed_form_count(
      cfg.vocab_size, cfg.d_model, cfg.d_ff, cfg.num_encoder_layers,
      cfg.attention_bias, cfg.pre_ln)


def test_records_saved_before_attention_bias_existed_load_with_biases():
  record = TransformerConfig.preset("tiny").to_dict()
  del record["attention_bias"]
  assert TransformerConfig.from_dict(record).attention_bias is True
  assert TransformerConfig.preset("tiny").attention_bias is False
  params = init_params(TransformerConfig.from_dict(record), jax.random.key(0))
  attention = params["encoder"]["layers_0"]["self_attention"]
  assert attention["query"]["bias"].shape == (4, 8)
  assert "bias" not in init_params(TINY, jax.random.key(0))[
      "encoder"]["layers_0"]["self_attention"]["query"]


def test_separate_vocabularies_have_their_own_matrices():
  cfg = TINY.replace(share_embeddings=False, target_vocab_size=80,
                     tie_output_embedding=False)
  shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  assert shapes["source_embedding"]["embedding"].shape == (64, 32)
  assert shapes["target_embedding"]["embedding"].shape == (80, 32)
  assert shapes["output_projection"]["kernel"].shape == (32, 80)
  out = logits_of(init_params(cfg, jax.random.key(1)), np.ones((1, 5), np.int32),
                  np.ones((1, 4), np.int32), cfg=cfg)
  assert out.shape == (1, 4, 80)


@pytest.mark.parametrize("changes, field", [
    (dict(d_model=30, num_heads=4), "num_heads"),
    (dict(dropout_rate=1.0), "dropout_rate"),
    (dict(dropout_rate=-0.1), "dropout_rate"),
    (dict(attention_dropout_rate=1.5), "attention_dropout_rate"),
    (dict(vocab_size=2), "vocab_size"),
    (dict(target_vocab_size=80), "share_embeddings"),
    (dict(dtype="int8"), "dtype"),
    (dict(num_encoder_layers=0), "num_encoder_layers"),
    (dict(d_ff=0), "d_ff"),
])
def test_impossible_configs_name_the_field(changes, field):
  with pytest.raises(ConfigError, match=rf"TransformerConfig\.{field}:"):
    TINY.replace(**changes)


def test_unknown_preset_and_field_are_refused():
  with pytest.raises(ConfigError, match="unknown preset 'huge'"):
    TransformerConfig.preset("huge")
  with pytest.raises(ConfigError, match="no field"):
    TransformerConfig.from_dict({"d_modle": 8})


def test_every_parameter_has_logical_axis_names():
  boxed = Transformer(TINY).init(jax.random.key(0), jnp.ones((1, 4), jnp.int32),
                                 jnp.ones((1, 4), jnp.int32))["params"]
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  for box in leaves:
    assert len(box.names) == box.value.ndim
  specs = nn.get_partition_spec(boxed)
  assert tuple(specs["shared_embedding"]["embedding"]) == ("vocab", "embed")
  attn = specs["encoder"]["layers_0"]["self_attention"]
  assert tuple(attn["query"]["kernel"]) == ("embed", "heads", "kv")
  assert tuple(attn["out"]["kernel"]) == ("heads", "kv", "embed")
  assert tuple(specs["decoder"]["layers_1"]["ffn"]["wi"]["kernel"]) == ("embed", "mlp")


# ------------------------------------------------------------- behaviour ---

def test_causality_future_targets_do_not_change_earlier_logits(params):
  rng = np.random.default_rng(0)
  src = random_tokens(rng, (2, 7))
  tgt = random_tokens(rng, (2, 6))
  base = logits_of(params, src, tgt)
  for t in range(6):
    changed = tgt.copy()
    changed[:, t] = (changed[:, t] + 5 - 2) % (TINY.vocab_size - 2) + 2
    out = logits_of(params, src, changed)
    # Logit at position p predicts tgt[p] from tgt[:p]: positions <= t unchanged.
    np.testing.assert_array_equal(out[:, : t + 1], base[:, : t + 1])
    if t + 1 < 6:
      assert np.abs(out[:, t + 1:] - base[:, t + 1:]).max() > 1e-4


def test_appending_padding_changes_no_real_logit(params):
  rng = np.random.default_rng(1)
  src = random_tokens(rng, (2, 5))
  tgt = random_tokens(rng, (2, 4))
  base = logits_of(params, src, tgt)
  padded = logits_of(params, np.pad(src, ((0, 0), (0, 6))),
                     np.pad(tgt, ((0, 0), (0, 3))))
  np.testing.assert_allclose(padded[:, :4], base, atol=1e-5, rtol=1e-5)


def test_packed_pairs_give_the_logits_of_each_pair_alone(params):
  rng = np.random.default_rng(2)
  src_a, tgt_a = random_tokens(rng, (1, 4)), random_tokens(rng, (1, 3))
  src_b, tgt_b = random_tokens(rng, (1, 5)), random_tokens(rng, (1, 4))
  alone_a = logits_of(params, src_a, tgt_a)
  alone_b = logits_of(params, src_b, tgt_b)

  def pack(a, b, total):
    row = np.concatenate([a, b, np.zeros((1, total - a.shape[1] - b.shape[1]),
                                         np.int32)], axis=1)
    seg = np.zeros_like(row)
    seg[:, : a.shape[1]] = 1
    seg[:, a.shape[1]: a.shape[1] + b.shape[1]] = 2
    pos = np.zeros_like(row)
    pos[:, : a.shape[1]] = np.arange(a.shape[1])
    pos[:, a.shape[1]: a.shape[1] + b.shape[1]] = np.arange(b.shape[1])
    return row, seg, pos

  src, src_seg, src_pos = pack(src_a, src_b, 12)
  tgt, tgt_seg, tgt_pos = pack(tgt_a, tgt_b, 9)
  packed = logits_of(params, src, tgt, src_segment_ids=src_seg,
                     tgt_segment_ids=tgt_seg, src_positions=src_pos,
                     tgt_positions=tgt_pos)
  np.testing.assert_allclose(packed[:, :3], alone_a, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(packed[:, 3:7], alone_b, atol=1e-5, rtol=1e-5)


def cached_logits(params, cache, encoded, src, tgt):
  """Logits [batch, len, vocab] of feeding tgt one token per step through
  the cached decoder (start token first), from ``cache``."""
  cached_model = Transformer(TINY, use_cache=True)
  step = jax.jit(lambda cache, token: cached_model.apply(
      {"params": params, "cache": cache}, encoded, src, token,
      method=Transformer.decode, mutable=["cache"]))
  token, steps = np.zeros((tgt.shape[0], 1), np.int32), []
  for t in range(tgt.shape[1]):
    logits, variables = step(cache, token)
    cache = variables["cache"]
    steps.append(np.asarray(logits[:, 0]))
    token = tgt[:, t: t + 1]
  return np.stack(steps, 1)


def test_cached_one_token_decoding_equals_teacher_forcing(params):
  rng = np.random.default_rng(3)
  src = np.pad(random_tokens(rng, (3, 6)), ((0, 0), (0, 2)))
  tgt = random_tokens(rng, (3, 7))
  teacher = logits_of(params, src, tgt)
  model = Transformer(TINY)
  encoded = model.apply({"params": params}, src, method=Transformer.encode)
  cache = init_cache(TINY, params, encoded, max_decode_len=7)
  np.testing.assert_allclose(cached_logits(params, cache, encoded, src, tgt),
                             teacher, atol=1e-5, rtol=1e-5)


def test_beams_sharing_a_sentences_cross_cache_decode_as_repeated_rows(
    params):
  # Beam search's cache: each sentence's cross-attention keys and values
  # once, shared by its beams (init_cache's repeat), against teacher forcing
  # of the source repeated for each beam, every beam fed its own tokens.
  rng = np.random.default_rng(5)
  src = np.pad(random_tokens(rng, (2, 6)), ((0, 0), (0, 2)))
  src[1, 3:] = 0
  beams = 3
  tgt = random_tokens(rng, (2 * beams, 5))
  encoded = Transformer(TINY).apply({"params": params}, src,
                                    method=Transformer.encode)
  cache = init_cache(TINY, params, encoded, max_decode_len=5, repeat=beams)
  cross = cache["decoder"]["layers_0"]["cross_attention"]
  assert cross["cross_key"].shape == (2, TINY.num_heads, TINY.head_dim, 8)
  assert cross["cross_value"].shape == (2, TINY.num_heads, 8, TINY.head_dim)
  self_key = cache["decoder"]["layers_0"]["self_attention"]["cached_key"]
  assert self_key.shape[0] == 2 * beams
  flat_src = np.repeat(src, beams, axis=0)
  teacher = logits_of(params, flat_src, tgt)
  np.testing.assert_allclose(
      cached_logits(params, cache, np.repeat(encoded, beams, axis=0),
                    flat_src, tgt), teacher, atol=1e-5, rtol=1e-5)


def test_beams_following_their_parents_decode_their_whole_histories(params):
  # Each step of beam search the surviving hypotheses continue other beams'
  # (random parents here, a parent often chosen twice): a first child keeps
  # its parent's slot, the others get the slots left without a child, and
  # their parents' histories are copied there. Each step's logits against
  # teacher forcing of each slot's whole history, rebuilt here from the
  # parents and tokens.
  rng = np.random.default_rng(7)
  sentences, beams, steps = 3, 4, 7
  src = np.pad(random_tokens(rng, (sentences, 6)), ((0, 0), (0, 2)))
  src[1, 4:] = 0
  fed = random_tokens(rng, (sentences * beams, steps))
  parents = rng.integers(0, beams, size=(steps, sentences, beams))
  parents[1, 0] = [2, 2, 2, 2]   # one parent for the whole beam
  parents[2, 0] = [3, 2, 1, 0]   # every hypothesis one child
  encoded = Transformer(TINY).apply({"params": params}, src,
                                    method=Transformer.encode)
  cache = init_cache(TINY, params, encoded, max_decode_len=steps,
                     repeat=beams)
  flat_src = np.repeat(src, beams, axis=0)
  model = Transformer(TINY, use_cache=True)
  step = jax.jit(lambda cache, token: model.apply(
      {"params": params, "cache": cache}, np.repeat(encoded, beams, axis=0),
      flat_src, token, method=Transformer.decode, mutable=["cache"]))
  history = [[[] for _ in range(beams)] for _ in range(sentences)]
  token = np.zeros((sentences * beams, 1), np.int32)
  for t in range(steps):
    if t:
      parent = jnp.asarray(parents[t])
      slot, copied = decoding._keep_slots(parent, beams)
      cache = decoding._copy_histories(cache, parent, slot, copied, beams)
      slot, copied = np.asarray(slot), np.asarray(copied)
      moved = [[None] * beams for _ in range(sentences)]
      for b in range(sentences):
        assert sorted(slot[b]) == list(range(beams))
        kept = ~copied[b]
        assert np.all(slot[b][kept] == parents[t, b][kept])
        assert kept.sum() == len(set(parents[t, b]))
        for k in range(beams):
          moved[b][slot[b, k]] = (history[b][parents[t, b, k]] +
                                  [fed[b * beams + slot[b, k], t - 1]])
      history = moved
      token = fed[:, t - 1:t]
    logits, variables = step(cache, token)
    cache = variables["cache"]
    tgt = np.array([h + [2] for row in history for h in row], np.int32)
    np.testing.assert_allclose(np.asarray(logits[:, 0]),
                               logits_of(params, flat_src, tgt)[:, t],
                               atol=1e-5, rtol=1e-5)


def test_dropout_uses_the_rng_only_in_training_mode(params):
  rng = np.random.default_rng(4)
  src, tgt = random_tokens(rng, (2, 6)), random_tokens(rng, (2, 5))
  model = Transformer(TINY)
  apply = jax.jit(lambda key, det: model.apply(
      {"params": params}, src, tgt, deterministic=det,
      rngs={"dropout": jax.random.key(key)}), static_argnums=1)
  run = lambda key, det: np.asarray(apply(key, det))
  np.testing.assert_array_equal(run(1, True), run(2, True))
  np.testing.assert_allclose(run(1, True), logits_of(params, src, tgt),
                             atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(run(1, False), run(1, False))
  assert np.abs(run(1, False) - run(2, False)).max() > 1e-3
  assert np.abs(run(1, False) - run(1, True)).max() > 1e-3


def test_attention_weights_shape_normalisation_and_masking(params):
  rng = np.random.default_rng(5)
  src = np.pad(random_tokens(rng, (2, 5)), ((0, 0), (0, 3)))   # 3 pad keys
  tgt = random_tokens(rng, (2, 4))
  weights = attention_weights(TINY, params, src, tgt)
  enc, cross = weights["encoder_self"], weights["encoder_decoder"]
  dec = weights["decoder_self"]
  assert len(enc) == TINY.num_encoder_layers and len(cross) == TINY.num_decoder_layers
  assert enc[0].shape == (2, 4, 8, 8)
  assert cross[1].shape == (2, 4, 4, 8)
  assert dec[0].shape == (2, 4, 4, 4)
  for w in (enc[0][:, :, :5], cross[0], dec[1]):
    np.testing.assert_allclose(np.asarray(w).sum(-1), 1.0, atol=1e-5)
  assert np.all(np.asarray(enc[1])[:, :, :5, 5:] == 0)     # padded keys
  assert np.all(np.asarray(cross[0])[..., 5:] == 0)
  assert np.all(np.asarray(dec[0])[0, 0][np.triu_indices(4, 1)] == 0)  # future


def test_bfloat16_compute_keeps_float32_params_and_close_logits(params):
  cfg = TINY.replace(dtype="bfloat16")
  rng = np.random.default_rng(6)
  src, tgt = random_tokens(rng, (2, 6)), random_tokens(rng, (2, 5))
  fresh = init_params(cfg, jax.random.key(0))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(fresh))
  out = logits_of(params, src, tgt, cfg=cfg)
  assert out.dtype == np.float32
  ref = logits_of(params, src, tgt)
  assert np.abs(out - ref).max() < 0.1 * np.abs(ref).max()


def test_pre_ln_option_adds_final_norms_and_runs():
  cfg = TINY.replace(pre_ln=True)
  p = init_params(cfg, jax.random.key(0))
  assert "final_norm" in p["encoder"] and "final_norm" in p["decoder"]
  assert "final_norm" not in init_params(TINY, jax.random.key(0))["encoder"]
  assert np.isfinite(logits_of(p, np.full((1, 4), 5), np.full((1, 3), 6),
                               cfg=cfg)).all()


def test_too_long_input_names_max_len(params):
  with pytest.raises(ValueError, match="max_len=128"):
    logits_of(params, np.full((1, 129), 5), np.full((1, 3), 5))


# --------------------------------------- the paper's equations in NumPy ---

def np_layer_norm(x, p, eps=TINY.layer_norm_epsilon):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def np_multi_head(q_in, kv_in, p, mask):
  """softmax(Q K^T / sqrt(d_k)) V per head, concatenated, times W^O."""
  d_model = q_in.shape[-1]
  heads = p["query"]["kernel"].shape[1]
  d_k = d_model // heads
  outs = []
  for h in range(heads):
    w = lambda name: p[name]["kernel"][:, h, :]
    b = lambda name: p[name]["bias"][h] if "bias" in p[name] else 0.0
    q = q_in @ w("query") + b("query")
    k = kv_in @ w("key") + b("key")
    v = kv_in @ w("value") + b("value")
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(d_k)
    scores = np.where(mask, scores, -1e30)
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    outs.append(scores / scores.sum(-1, keepdims=True) @ v)
  concat = np.concatenate(outs, -1)                       # [.., len, d_model]
  w_o = p["out"]["kernel"].reshape(d_model, d_model)
  return concat @ w_o + p["out"].get("bias", 0.0)


def np_ffn(x, p):
  hidden = np.maximum(0, x @ p["wi"]["kernel"] + p["wi"]["bias"])
  return hidden @ p["wo"]["kernel"] + p["wo"]["bias"]


def to_numpy(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def test_encoder_layer_matches_numpy_equations():
  rng = np.random.default_rng(7)
  x = rng.normal(size=(2, 5, 32)).astype(np.float32)
  keep = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool)
  mask = keep[:, None, None, :] & keep[:, None, :, None]
  layer = EncoderLayer(TINY)
  p = nn.unbox(layer.init(jax.random.key(1), x, mask, True)["params"])
  out = np.asarray(layer.apply({"params": p}, x, mask, True))
  p, x64 = to_numpy(p), x.astype(np.float64)
  m = mask[:, 0]
  h = np_layer_norm(x64 + np_multi_head(x64, x64, p["self_attention"], m),
                    p["self_attention_norm"])
  expected = np_layer_norm(h + np_ffn(h, p["ffn"]), p["ffn_norm"])
  rows = keep  # padded query rows are never read
  np.testing.assert_allclose(out[rows], expected[rows], atol=1e-5, rtol=1e-5)


def test_decoder_layer_matches_numpy_equations():
  rng = np.random.default_rng(8)
  y = rng.normal(size=(2, 4, 32)).astype(np.float32)
  enc = rng.normal(size=(2, 6, 32)).astype(np.float32)
  src_keep = np.array([[1] * 6, [1, 1, 1, 1, 0, 0]], bool)
  causal = np.tril(np.ones((4, 4), bool))[None, None]
  self_mask = np.broadcast_to(causal, (2, 1, 4, 4))
  cross_mask = np.broadcast_to(src_keep[:, None, None, :], (2, 1, 4, 6))
  layer = DecoderLayer(TINY)
  p = nn.unbox(layer.init(jax.random.key(2), y, enc, self_mask, cross_mask,
                          True)["params"])
  out = np.asarray(layer.apply({"params": p}, y, enc, self_mask, cross_mask,
                               True))
  p, y64, e64 = to_numpy(p), y.astype(np.float64), enc.astype(np.float64)
  h = np_layer_norm(y64 + np_multi_head(y64, y64, p["self_attention"],
                                        self_mask[:, 0]),
                    p["self_attention_norm"])
  h = np_layer_norm(h + np_multi_head(h, e64, p["cross_attention"],
                                      cross_mask[:, 0]),
                    p["cross_attention_norm"])
  expected = np_layer_norm(h + np_ffn(h, p["ffn"]), p["ffn_norm"])
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


def test_positional_encoding_follows_section_3_5():
  from model import sinusoidal_table
  table = sinusoidal_table(50, 16)
  pos, i = 17, 3
  assert np.isclose(table[pos, 2 * i], np.sin(pos / 10000 ** (2 * i / 16)))
  assert np.isclose(table[pos, 2 * i + 1], np.cos(pos / 10000 ** (2 * i / 16)))


def test_a_cache_padded_beyond_the_encoded_positions_decodes_the_same(params):
  # The searches run the encoder over a batch's longest source only and pad
  # the cross-attention keys and values to the batch's width
  # (cross_attention_cache's src_len): behind the pad mask, the logits of
  # teacher forcing over the whole width.
  rng = np.random.default_rng(6)
  src = np.pad(random_tokens(rng, (3, 6)), ((0, 0), (0, 5)))
  src[1, 4:] = 0
  tgt = random_tokens(rng, (3, 5))
  teacher = logits_of(params, src, tgt)
  encoded = Transformer(TINY).apply({"params": params}, src[:, :6],
                                    method=Transformer.encode)
  cache = init_cache(TINY, params, encoded, max_decode_len=5,
                     cross=cross_attention_cache(TINY, params, encoded,
                                                 src_len=11))
  key = cache["decoder"]["layers_0"]["cross_attention"]["cross_key"]
  assert key.shape[3] == 11 and not np.asarray(key)[..., 6:].any()
  np.testing.assert_allclose(cached_logits(params, cache, encoded, src, tgt),
                             teacher, atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="shorter than the encoder output"):
    cross_attention_cache(TINY, params, encoded, src_len=4)
