"""Tests of train/inspect.py: nearest tokens by cosine similarity."""

import numpy as np
import orbax.checkpoint as ocp
import pytest

import tokenizer as tokenizer_lib
from test_evaluate import shared_workdir  # tests/ is on sys.path
from train import inspect as inspect_cli


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return shared_workdir(tmp_path_factory)[0]


def _saved_embeddings(workdir, step):
  """The matrix as a user would read it with orbax alone."""
  state = ocp.StandardCheckpointer().restore(
      f"{workdir}/checkpoints/{step}/state")
  return np.asarray(state["params"]["shared_embedding"]["embedding"],
                    np.float64)


def _numpy_neighbours(matrix, ids, k):
  query = matrix[ids].mean(axis=0)
  cos = matrix @ query / (np.linalg.norm(matrix, axis=1) *
                          np.linalg.norm(query))
  for i in {0, 1, 2, *ids}:
    cos[i] = -np.inf
  order = np.argsort(-cos)[:k]
  return order, cos[order]


@pytest.mark.parametrize("word", ["luz", "tinieblas"])
def test_similarities_equal_numpy_on_the_saved_matrix(workdir, word, capsys):
  tok = tokenizer_lib.load(tokenizer_lib.model_path(workdir))
  ids = [i for i in tok.encode(word) if i != 1]
  assert (len(ids) == 1) == (word == "luz")  # one piece / several pieces
  assert inspect_cli.main(["inspect", f"--workdir={workdir}",
                           f"--nearest={word}", "--k=5"]) == 0
  out = capsys.readouterr().out.splitlines()
  assert ("mean of" in out[0]) == (len(ids) > 1)
  rows = [line.split() for line in out[1:]]
  got_ids = [int(r[-1].rstrip(")")) for r in rows]
  got_sims = [float(r[2]) for r in rows]
  order, sims = _numpy_neighbours(_saved_embeddings(workdir, 30), ids, 5)
  assert got_ids == order.tolist()
  np.testing.assert_allclose(got_sims, sims, atol=1e-4)


def test_unknown_word_says_so(workdir, capsys):
  assert inspect_cli.main(["inspect", f"--workdir={workdir}",
                           "--nearest=\u65e5\u672c"]) == 1
  assert "unknown" in capsys.readouterr().out
