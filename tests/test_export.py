"""Tests of train/export.py: the CTranslate2 export computes what the model does.

On real tiny workdirs (tests/test_evaluate.py's ``make_workdir``: a
SentencePiece model and Orbax checkpoints), for post-LN and pre-LN blocks,
with and without attention biases: CTranslate2's per-token log-probabilities
(``score_batch``) equal the model's own log-softmax under teacher forcing, and
its greedy search returns the project's greedy output token for token.
"""

import pathlib

import jax
import numpy as np
import pytest

from test_evaluate import SOURCES, TARGETS, make_workdir  # tests/ is on sys.path
from model import PAD_ID, Transformer, decoding
from train import cli, export, inference
from train.translation import make_batches

ctranslate2 = pytest.importorskip("ctranslate2")

MAX_EXTRA_LEN = 6


@pytest.fixture(scope="module", params=[
    dict(), dict(pre_ln=True), dict(pre_ln=True, attention_bias=True)],
    ids=["post_ln", "pre_ln", "pre_ln_biases"])
def exported(request, tmp_path_factory):
  root = tmp_path_factory.mktemp("export")
  path, _, _ = make_workdir(root / "run", steps=(10,), **request.param)
  loaded = inference.load(path)
  out = export.export_ctranslate2(loaded, root / "ct2")
  return loaded, ctranslate2.Translator(str(out), intra_threads=1)


def _pieces(tok, ids):
  return [tok.id_to_piece(int(i)) for i in ids]


def test_scores_equal_the_models_log_probabilities(exported):
  loaded, translator = exported
  tok = loaded.tokenizer
  src_ids, tgt_ids = tok.encode_batch(SOURCES), tok.encode_batch(TARGETS)
  results = translator.score_batch(
      [_pieces(tok, s) for s in src_ids],
      [_pieces(tok, t[:-1]) for t in tgt_ids])   # CTranslate2 adds the eos
  # One padded batch, one compiled forward pass (padding changes no real
  # logit: tests/test_model.py).
  src = np.full((len(src_ids), max(map(len, src_ids))), PAD_ID, np.int32)
  tgt = np.full((len(tgt_ids), max(map(len, tgt_ids))), PAD_ID, np.int32)
  for row, (s, t) in enumerate(zip(src_ids, tgt_ids)):
    src[row, :len(s)], tgt[row, :len(t)] = s, t
  model = Transformer(loaded.model_config)
  logits = jax.jit(model.apply)({"params": loaded.params}, src, tgt)
  log_probs = np.asarray(jax.nn.log_softmax(logits))
  for row, (t, result) in enumerate(zip(tgt_ids, results)):
    ours = np.take_along_axis(log_probs[row, :len(t)], t[:, None], -1)[:, 0]
    np.testing.assert_allclose(result.log_probs, ours, atol=1e-4)


def test_greedy_equals_the_projects_greedy(exported):
  loaded, translator = exported
  tok = loaded.tokenizer
  ids = tok.encode_batch(SOURCES + ["Fin."])
  [(order, src)] = make_batches(ids, 8, loaded.model_config.max_len)
  ours = decoding.strip_special(decoding.greedy_search(
      loaded.model_config, loaded.params, src, max_extra_len=MAX_EXTRA_LEN))
  for row, i in enumerate(order):
    # Our limit: source length + MAX_EXTRA_LEN tokens, eos included.
    [result] = translator.translate_batch(
        [_pieces(tok, ids[i])], beam_size=1, min_decoding_length=1,
        max_decoding_length=len(ids[i]) + MAX_EXTRA_LEN - 1)
    assert result.hypotheses[0] == _pieces(tok, ours[row]), SOURCES[i:i + 1]


def test_export_cli(exported, tmp_path, capsys):
  loaded, _ = exported
  workdir = str(pathlib.Path(
      loaded.experiment_config.data.eval_src_file).parents[1])
  out = tmp_path / "model"
  assert cli.run_command(export.main, [
      "export", f"--workdir={workdir}", f"--output={out}"]) == 0
  assert (out / "model.bin").is_file() and (out / "spm.model").is_file()
  assert "CTranslate2 model" in capsys.readouterr().out
  # A non-empty --output is kept unless --overwrite; --output is required.
  for args, needle in (([f"--output={out}"], "--overwrite"),
                       ([], "--output is required")):
    code = cli.run_command(export.main, ["export", f"--workdir={workdir}",
                                         *args])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err
