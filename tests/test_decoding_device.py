"""Tests of decoding's device mode: each search one jitted program with one
while loop, no host read, the host mode's tokens, compiled once per shape."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import EOS_ID, PAD_ID
from model import decoding
from train import evaluate
from train.translation import DecodeOptions

from test_decoding import CONFIG, _peaky_params


@pytest.fixture(scope="module")
def params():
  return _peaky_params(CONFIG, 0)


def _sources(lengths, seed: int, width: int):
  """Random source rows of the given lengths (eos last), PAD_ID after."""
  rng = np.random.RandomState(seed)
  src = np.full((len(lengths), width), PAD_ID, np.int32)
  for row, length in enumerate(lengths):
    src[row, :length - 1] = rng.randint(3, CONFIG.vocab_size, size=length - 1)
    src[row, length - 1] = EOS_ID
  return src


# Several batches: mixed lengths (rows that end early, so the host mode
# drops them and grows its cache), an empty source, a wide bucket.
SOURCES = {
    "mixed": _sources([3, 20, 3, 3, 20, 3, 30, 3], seed=3, width=32),
    "with_empty": _sources([1, 7, 12, 4], seed=5, width=16),
    "wide": _sources([5, 9, 2, 14], seed=6, width=64),
}
EXTRA = 10

SEARCHES = {
    "greedy": lambda p, s, mode: decoding.greedy_search(
        CONFIG, p, s, max_extra_len=EXTRA, mode=mode),
    "sample": lambda p, s, mode: decoding.sample(
        CONFIG, p, s, jax.random.key(11), temperature=0.8, top_k=20,
        top_p=0.95, max_extra_len=EXTRA, mode=mode),
    "beam": lambda p, s, mode: decoding.beam_search(
        CONFIG, p, s, beam_size=3, alpha=0.6, max_extra_len=EXTRA, mode=mode),
}


@pytest.mark.parametrize("method", list(SEARCHES))
def test_device_mode_gives_the_host_modes_tokens(params, method):
  search = SEARCHES[method]
  for name, src in SOURCES.items():
    host = search(params, jnp.asarray(src), "host")
    device = search(params, src, "device")
    if method == "beam":
      np.testing.assert_array_equal(np.asarray(device.sequences),
                                    np.asarray(host.sequences), err_msg=name)
      np.testing.assert_allclose(np.asarray(device.scores),
                                 np.asarray(host.scores), rtol=1e-5,
                                 err_msg=name)
    else:
      np.testing.assert_array_equal(np.asarray(device), np.asarray(host),
                                    err_msg=name)


def _count_while_loops(search, params, src):
  """(while loops in the jaxpr, in the lowered StableHLO) of the search
  traced whole under one jax.jit.

  In the StableHLO, a CPU's threefry hash (the PRNG behind fold_in and
  each draw) is a loop of its rounds, in functions of its own: part of
  drawing a number, not of the search, and not counted.
  """
  fn = jax.jit(lambda p, s: search(p, s, "device"))
  jaxpr = str(jax.make_jaxpr(fn)(params, src))
  functions = fn.lower(params, src).as_text().split("func.func ")[1:]
  hlo = sum(f.count("stablehlo.while") for f in functions
            if not f.split("@", 1)[1].startswith("threefry"))
  return jaxpr.count(" while["), hlo


@pytest.mark.parametrize("method", list(SEARCHES))
def test_device_mode_is_one_jitted_program_with_one_while_loop(params,
                                                               method):
  # A limit of 32 + 10 tokens: the host mode would need segments (16, 32,
  # 42) and host reads between them, which cannot trace; the device mode
  # traces whole, and its one loop runs every step.
  search, src = SEARCHES[method], jnp.asarray(SOURCES["mixed"])
  assert _count_while_loops(search, params, src) == (1, 1)
  with pytest.raises(ValueError, match="grow_cache=False"):
    jax.jit(lambda p, s: search(p, s, "host"))(params, src)
  jitted = jax.jit(lambda p, s: search(p, s, "device"))(params, src)
  host = search(params, src, "host")
  if method == "beam":
    jitted, host = jitted.sequences, host.sequences
  np.testing.assert_array_equal(np.asarray(jitted), np.asarray(host))


def test_host_modes_one_loop_beam_copies_in_a_loop_of_its_own(params):
  # The counter above can fail: beam search's host form moves histories in
  # a loop inside its step (a second while), which the device form gathers.
  src = jnp.asarray(_sources([9], seed=4, width=16))
  fn = jax.jit(lambda p, s: decoding.beam_search(
      CONFIG, p, s, beam_size=3, max_extra_len=EXTRA, grow_cache=False,
      mode="host"))
  assert str(jax.make_jaxpr(fn)(params, src)).count(" while[") == 2


def test_mode_auto_is_device_off_a_cpu(monkeypatch):
  assert jax.default_backend() == "cpu"
  assert decoding.search_mode("auto") == "host"
  assert decoding.search_mode("device") == "device"
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert decoding.search_mode("auto") == "device"
  assert decoding.search_mode("host") == "host"
  with pytest.raises(ValueError, match="mode='tpu'.*auto, host, device"):
    decoding.search_mode("tpu")
  with pytest.raises(ValueError, match="--mode=fast"):
    DecodeOptions(mode="fast")


class _Tokenizer:
  """Ids to text, enough for scoring."""

  def decode_batch(self, rows):
    return [" ".join(f"w{i}" for i in ids) for ids in rows]


def _eval_batches(rows: int = 4, max_len: int = 48):
  """Validation batches as the input pipeline gives them: src padded to
  max_len, a row mask (the last batch's padding rows are 0), indices."""
  lengths = [3, 9, 14, 5, 30, 22, 4, 11, 7, 2]
  src = _sources(lengths, seed=7, width=max_len)
  batches = []
  for start in range(0, len(lengths), rows):
    chunk = np.full((rows, max_len), PAD_ID, np.int32)
    chunk[:, 0] = EOS_ID
    part = src[start:start + rows]
    chunk[:len(part)] = part
    batches.append({"src": chunk,
                    "row_mask": (np.arange(rows) < len(part)).astype(np.int32),
                    "index": np.arange(start, start + rows) % len(lengths)})
  return batches, [f"w{i} w{i + 1}" for i in range(len(lengths))]


@pytest.mark.parametrize("method", ["beam", "greedy"])
def test_in_training_bleu_compiles_its_search_once(params, method):
  # Two validation BLEU passes with new params of the same shapes, as
  # training gives them: the first compiles a search for each batch's
  # length bucket (16 and 32 here), the second compiles nothing. (A limit
  # of source + 7 tokens, used by no other test: no program of this test
  # is compiled before it.)
  batches, references = _eval_batches()
  options = DecodeOptions(method=method, beam_size=3, max_extra_len=7,
                          mode="device")
  later = jax.tree.map(lambda x: x * 1.01, params)
  compiled = []

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event == "/jax/core/compile/backend_compile_duration":
      compiled.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    passes = []
    for p in (params, later):
      compiled.clear()
      scores = evaluate.validation_bleu(CONFIG, p, batches, references,
                                        _Tokenizer(), options)
      passes.append(len(compiled))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert set(scores) == {"bleu", "chrf"}
  assert passes[0] >= 2 and passes[1] == 0, passes
