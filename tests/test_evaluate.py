"""Tests of train/evaluate.py and train/inference.py: sacreBLEU scoring,
checkpoint loading and averaging, the CLI.

`make_workdir` builds a small but real workdir (SentencePiece model, Orbax
checkpoints written by train.checkpointing, config.json) in seconds; the
translate and inspect tests use it too.
"""

import json
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tokenizer as tokenizer_lib
from experiments.configs import base_config
from model import TransformerConfig, init_params
from train import checkpointing, evaluate, inference, translation

SOURCES = [
    "En el principio creó Dios los cielos y la tierra.",
    "Y la tierra estaba desordenada y vacía.",
    "Y dijo Dios: Sea la luz: y fué la luz.",
    "Y vió Dios que la luz era buena.",
    "Y llamó Dios á la luz Día, y á las tinieblas llamó Noche.",
    "Y fué la tarde y la mañana un día.",
]
TARGETS = [
    "In the beginning, God created the heavens and the earth.",
    "The earth was formless and empty.",
    "God said, \u201cLet there be light,\u201d and there was light.",
    "God saw the light, and saw that it was good.",
    "God called the light \u201cday\u201d, and the darkness he called \u201cnight\u201d.",
    "There was evening and there was morning, the first day.",
]


def make_workdir(path, steps=(10, 20, 30), distinct_last=True,
                 drop_fields=(), ema_decay=0.0, **model):
  """A workdir with a tokenizer and checkpoints of the `tiny` model.

  Steps share one random params tree, except the last one (distinct_last).
  model: TransformerConfig fields changed from the preset; drop_fields:
  model fields left out of the saved record (a checkpoint written before
  they existed); ema_decay > 0: a run that keeps a moving average of the
  params, saved as each step's params scaled by 0.5.
  Returns (workdir, model_config, {step: params}).
  """
  workdir = str(path)
  tok = tokenizer_lib.train(SOURCES + TARGETS, vocab_size=120)
  tokenizer_lib.save(tok, tokenizer_lib.model_path(workdir))
  data_dir = path / "data"
  data_dir.mkdir()
  (data_dir / "src.txt").write_text("\n".join(SOURCES) + "\n")
  (data_dir / "tgt.txt").write_text("\n".join(TARGETS) + "\n")
  config = base_config()
  config.model_preset = "tiny"
  config.data.name = "parallel_text"
  config.data.max_len = 32
  config.data.eval_src_file = str(data_dir / "src.txt")
  config.data.eval_tgt_file = str(data_dir / "tgt.txt")
  config.optimizer.ema_decay = ema_decay
  model_config = TransformerConfig.preset("tiny", vocab_size=tok.vocab_size,
                                          max_len=64, **model)
  init = jax.jit(init_params, static_argnums=0)
  shared = init(model_config, jax.random.key(0))
  saved = {}
  ckpt = checkpointing.Checkpointer(workdir)
  record = checkpointing.config_record(config, model_config)
  for field in drop_fields:
    del record["model"][field]
  for i, step in enumerate(steps):
    last = i == len(steps) - 1
    params = (init(model_config, jax.random.key(1))
              if last and distinct_last else shared)
    state = types.SimpleNamespace(
        step=jnp.int32(step), params=params,
        opt_state={"count": jnp.zeros((), jnp.int32)},
        ema_params=(jax.tree.map(lambda x: 0.5 * x, params) if ema_decay
                    else None))
    ckpt.save(step, state, None, record, force=True)
    saved[step] = params
  ckpt.close()
  (path / "config.json").write_text(json.dumps(record["experiment"]))
  return workdir, model_config, saved


_SHARED = {}


def shared_workdir(tmp_path_factory):
  """One make_workdir() per test session, shared by the test modules."""
  if "workdir" not in _SHARED:
    _SHARED["workdir"] = make_workdir(tmp_path_factory.mktemp("workdir"))
  return _SHARED["workdir"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return shared_workdir(tmp_path_factory)


def _sacrebleu_cli(ref_file, hyp_file):
  out = subprocess.run(
      [sys.executable, "-m", "sacrebleu", str(ref_file), "-i", str(hyp_file),
       "-m", "bleu", "chrf", "--format", "json", "-w", "6"],
      check=True, capture_output=True, text=True).stdout
  bleu, chrf = json.loads(out)
  return bleu, chrf


def test_score_equals_sacrebleu_command_line(tmp_path):
  hyps = ["God said, let there be light, and there was light.",
          "The earth was without form and void.",
          "In the beginning God made the heaven and the earth."]
  refs = [TARGETS[2], TARGETS[1], TARGETS[0]]
  (tmp_path / "hyp.txt").write_text("\n".join(hyps) + "\n")
  (tmp_path / "ref.txt").write_text("\n".join(refs) + "\n")
  bleu, chrf = _sacrebleu_cli(tmp_path / "ref.txt", tmp_path / "hyp.txt")
  ours = evaluate.score(hyps, refs)
  assert 10 < bleu["score"] < 90  # a non-trivial score
  assert ours["bleu"] == pytest.approx(bleu["score"], abs=1e-4)
  assert ours["chrf"] == pytest.approx(chrf["score"], abs=1e-4)
  assert ours["bleu_signature"] == bleu["signature"]
  assert "case:mixed" in ours["bleu_signature"]
  assert "tok:13a" in ours["bleu_signature"]


def test_averaging_copies_of_one_checkpoint_gives_it(workdir):
  path, _, saved = workdir
  averaged = inference.average_checkpoints(path, [10, 20])
  jax.tree.map(np.testing.assert_array_equal, averaged, saved[10])
  loaded = inference.load(path, checkpoint=20, average_last=5)
  assert loaded.steps == [10, 20]
  jax.tree.map(np.testing.assert_array_equal, loaded.params, saved[20])
  # Different checkpoints: the element-wise mean.
  mixed = inference.load(path, checkpoint="latest", average_last=2)
  assert mixed.steps == [20, 30]
  jax.tree.map(
      lambda m, a, b: np.testing.assert_allclose(m, (a + b) / 2, rtol=1e-6,
                                                 atol=1e-7),
      mixed.params, saved[20], saved[30])


def test_cli_bleu_equals_sacrebleu_on_written_files(workdir, tmp_path, capsys):
  path, _, _ = workdir
  out_dir = tmp_path / "eval"
  code = evaluate.main([
      "evaluate", f"--workdir={path}", "--split=validation",
      "--checkpoint=latest", "--average_last=2", "--beam_size=2",
      "--max_extra_len=4", "--batch_size=8", f"--output_dir={out_dir}"])
  assert code == 0
  printed = capsys.readouterr().out
  assert "BLEU" in printed and "nrefs:1|case:mixed" in printed
  assert "chrF2" in printed
  [json_file] = out_dir.glob("*.json")
  assert json_file.name == "validation.avg2_step20-30.beam2_a0.6.json"
  record = json.loads(json_file.read_text())
  hyp_file = record["hypotheses_file"]
  hyps = open(hyp_file, encoding="utf-8").read().splitlines()
  assert len(hyps) == len(SOURCES) == record["num_sentences"]
  bleu, chrf = _sacrebleu_cli(path + "/data/tgt.txt", hyp_file)
  assert record["bleu"] == pytest.approx(bleu["score"], abs=1e-4)
  assert record["chrf"] == pytest.approx(chrf["score"], abs=1e-4)
  assert record["steps"] == [20, 30]


def test_decode_ids_keeps_the_input_order(workdir):
  path, model_config, saved = workdir
  tok = tokenizer_lib.load(tokenizer_lib.model_path(path))
  ids = tok.encode_batch(SOURCES)
  options = translation.DecodeOptions(method="greedy", max_extra_len=4,
                                      batch_size=8)
  forward = translation.decode_ids(model_config, saved[30], ids, options)
  backward = translation.decode_ids(model_config, saved[30], ids[::-1], options)
  assert forward == backward[::-1]
  assert all(len(out) <= len(x) - 1 + 4 for out, x in zip(forward, ids))


def test_decode_ids_spreads_batches_over_devices(monkeypatch):
  """Several devices: each batch decoded once, by one of the threads, the
  outputs in the input order; a batch's error reaches the caller. (A stand-in
  search echoes the source, so nothing compiles; the real search on two
  devices is in test_translate.py.)"""
  import threading
  seen = []

  def echo(model_config, params, src, options, batch_index):
    assert jax.tree.leaves(params)[0].devices() == {jax.devices()[0]}
    seen.append((batch_index, threading.get_ident()))
    return np.asarray(src)
  monkeypatch.setattr(translation, "decode_batch", echo)
  rng = np.random.default_rng(0)
  ids = [np.append(rng.integers(3, 50, n), 1).astype(np.int32)
         for n in rng.integers(1, 30, 37)]
  options = translation.DecodeOptions(method="greedy", batch_size=4)
  config = TransformerConfig.preset("tiny", vocab_size=64)
  params = {"w": jnp.ones(3)}
  expected = [list(x[:-1]) for x in ids]
  assert translation.decode_ids(config, params, ids, options) == expected
  seen.clear()
  two = translation.decode_ids(config, params, ids, options,
                               devices=[jax.devices()[0]] * 2)
  assert two == expected
  assert sorted(i for i, _ in seen) == list(range(10))   # 37 / 4: 10 batches

  def fail_third(model_config, params, src, options, batch_index):
    if batch_index == 2:
      raise RuntimeError("batch 2 failed")
    return np.asarray(src)
  monkeypatch.setattr(translation, "decode_batch", fail_third)
  with pytest.raises(RuntimeError, match="batch 2 failed"):
    translation.decode_ids(config, params, ids, options,
                           devices=[jax.devices()[0]] * 2)


def test_validation_bleu_hook(workdir):
  path, model_config, saved = workdir
  tok = tokenizer_lib.load(tokenizer_lib.model_path(path))
  # 8 rows, 38 tokens at most: the shapes test_decode_ids_... compiled.
  src = np.zeros((8, 40), np.int32)
  picked = [4, 0, 2]
  for row, ids in enumerate(tok.encode_batch([SOURCES[i] for i in picked])):
    src[row, :len(ids)] = ids
  batch = {"src": src, "row_mask": np.array([1, 1, 1] + [0] * 5, np.int32),
           "index": np.array(picked + [-1] * 5, np.int32)}
  options = translation.DecodeOptions(method="greedy", max_extra_len=4)
  scores = evaluate.validation_bleu(model_config, saved[30], [batch],
                                    TARGETS, tok, options)
  assert set(scores) == {"bleu", "chrf"}
  assert 0 <= scores["bleu"] <= 100 and 0 <= scores["chrf"] <= 100


def test_max_sentences_scores_an_evenly_spaced_subset(workdir, tmp_path):
  assert evaluate.evenly_spaced(10, 4) == [0, 2, 5, 7]
  assert evaluate.evenly_spaced(3, 5) == [0, 1, 2]
  path, _, _ = workdir
  options = translation.DecodeOptions(method="greedy", max_extra_len=4,
                                      batch_size=8)
  part = evaluate.run(path, split="validation", options=options,
                      output_dir=tmp_path, max_sentences=3)
  assert part["num_sentences"] == 3 and part["data"] == "validation.3of6"
  hyps = open(part["hypotheses_file"], encoding="utf-8").read().splitlines()
  whole = evaluate.run(path, split="validation", options=options,
                       output_dir=tmp_path)
  every = open(whole["hypotheses_file"], encoding="utf-8").read().splitlines()
  assert hyps == [every[i] for i in (0, 2, 4)]


def test_checkpoint_written_before_attention_bias_existed_restores(tmp_path):
  # Records of that layout lack the field; their params have the biases.
  path, model_config, saved = make_workdir(
      tmp_path / "old", steps=(10,), attention_bias=True,
      drop_fields=("attention_bias",))
  loaded = inference.load(path)
  assert loaded.model_config.attention_bias
  jax.tree.map(np.testing.assert_array_equal, loaded.params, saved[10])
  assert "bias" in loaded.params["encoder"]["layers_0"]["self_attention"]["query"]


def test_ema_loads_the_moving_average_in_place_of_the_params(tmp_path):
  path, _, saved = make_workdir(tmp_path / "run", steps=(10, 20),
                                ema_decay=0.99)
  leaf = lambda p: np.asarray(p["shared_embedding"]["embedding"])
  raw = inference.load(path, "latest")
  ema = inference.load(path, "latest", ema=True)
  assert not raw.ema and ema.ema and ema.steps == [20]
  np.testing.assert_array_equal(leaf(raw.params), leaf(saved[20]))
  np.testing.assert_allclose(leaf(ema.params), 0.5 * leaf(saved[20]))
  averaged = inference.load(path, "latest", average_last=2, ema=True)
  np.testing.assert_allclose(
      leaf(averaged.params), 0.25 * (leaf(saved[10]) + leaf(saved[20])),
      rtol=1e-6)
  assert inference.checkpoint_tag(ema.steps, ema.ema) == "ema_step20"
  record = evaluate.run(path, input_file=str(tmp_path / "run/data/src.txt"),
                        reference_file=str(tmp_path / "run/data/tgt.txt"),
                        ema=True,
                        options=translation.DecodeOptions(method="greedy"))
  assert record["ema"] and ".ema_step20.greedy." in record["json_file"]


def test_choose_keeps_the_best_validation_choice_and_scores_test(tmp_path):
  from train import choose  # pylint: disable=import-outside-toplevel
  assert choose.best([("a", 1.0), ("b", 3.0), ("c", 3.0)]) == "b"
  path, _, _ = make_workdir(tmp_path / "run", ema_decay=0.99)
  greedy = translation.DecodeOptions(method="greedy", max_extra_len=4,
                                     batch_size=8)
  # References equal to the moving average's greedy output: it must win.
  ema = evaluate.run(path, split="validation", ema=True, options=greedy,
                     output_dir=tmp_path / "ref")
  with open(ema["hypotheses_file"], encoding="utf-8") as f:
    (tmp_path / "run/data/tgt.txt").write_text(f.read(), encoding="utf-8")
  logged = []
  record = choose.run(path, max_sentences=0, alphas=(0.0, 2.0), beam_size=3,
                      batch_size=8, max_extra_len=4, test_split="test",
                      output_dir=tmp_path / "val",
                      test_output_dir=tmp_path / "test", log=logged.append)
  # Each pass's score, computed again from the translations it wrote.
  references = (tmp_path / "run/data/tgt.txt").read_text(
      encoding="utf-8").splitlines()
  def bleu(stem):
    (hyps,) = (tmp_path / "val").glob(f"validation.{stem}.txt")
    return evaluate.score(hyps.read_text(encoding="utf-8").splitlines(),
                          references)["bleu"]
  greedy_bleu = {"last": bleu("step30.greedy"),
                 "mean_last3": bleu("avg3_step10-30.greedy"),
                 "ema": bleu("ema_step30.greedy")}
  assert record["greedy"] == pytest.approx(greedy_bleu) and len(logged) == 5
  assert greedy_bleu["ema"] == pytest.approx(100.0)
  assert max(greedy_bleu["last"], greedy_bleu["mean_last3"]) < 100.0
  assert record["params"] == "ema"
  beam_bleu = {a: bleu(f"ema_step30.beam3_a{a:g}") for a in (0.0, 2.0)}
  assert record["beam"] == pytest.approx({"0": beam_bleu[0.0],
                                          "2": beam_bleu[2.0]})
  assert record["alpha"] == choose.best(list(beam_bleu.items()))
  assert record["flags"] == ["--ema", f"--alpha={record['alpha']:g}",
                             "--beam_size=3"]
  # The test pass: the chosen model and alpha over all of the split (here
  # the validation verses again, so the same translations).
  chosen = tmp_path / f"val/validation.ema_step30.beam3_a{record['alpha']:g}.txt"
  with open(record["test"]["hypotheses_file"], encoding="utf-8") as f:
    assert f.read() == chosen.read_text(encoding="utf-8")
  assert record["test"]["data"] == "test"
  # (On this random model no hypothesis ends before its length limit, so
  # both length penalties give the same translations: the test pass's own
  # record says which alpha and params it used.)
  test_record = json.loads(open(record["test"]["json_file"]).read())
  assert test_record["decoding"]["alpha"] == record["alpha"]
  assert test_record["decoding"]["beam_size"] == 3 and test_record["ema"]
  assert record["test"]["hypotheses_file"].startswith(str(tmp_path / "test"))
  assert json.loads((tmp_path / "val/choice.json").read_text())["params"] == "ema"
  assert [c[0] for c in choose.params_candidates(path)] == [
      "last", "mean_last3", "ema"]


def test_choose_skips_the_choices_a_run_does_not_have(workdir, tmp_path):
  from train import choose  # pylint: disable=import-outside-toplevel
  path, _, _ = workdir   # three checkpoints, no moving average
  assert [c[0] for c in choose.params_candidates(path)] == ["last",
                                                            "mean_last3"]
