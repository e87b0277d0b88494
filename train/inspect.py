"""Nearest tokens in the learned embedding space (cosine similarity).

    python -m train.inspect --workdir=<dir> --nearest=<word> [--k=10]
        [--checkpoint=latest|best|<step>] [--table=auto|source|target]

The word is split by the run's SentencePiece model; a word of several pieces
is represented by the mean of their embeddings. Prints the k tokens (special
ids and the word's own pieces excluded) whose embeddings have the highest
cosine similarity with it. A word that maps to the unknown piece is reported
as unknown (exit status 1). Uses the shared embedding (joint vocabulary), or
the source / target table of a model with separate vocabularies.

(Run it as ``python -m train.inspect``; this module never shadows the
standard library's ``inspect``, since it is only reachable as
``train.inspect``.)
"""

from __future__ import annotations

import sys
from typing import NamedTuple, Sequence

import numpy as np
from absl import flags

import tokenizer as tokenizer_lib
from train import cli, inference

SPECIAL_IDS = (tokenizer_lib.PAD_ID, tokenizer_lib.EOS_ID, tokenizer_lib.UNK_ID)


class UnknownWordError(KeyError):
  """The word (or one of its pieces) is not in the vocabulary."""


class Neighbour(NamedTuple):
  id: int
  piece: str
  similarity: float


def embedding_table(params, table: str = "auto") -> np.ndarray:
  """float32 [vocab, d_model]: shared, source or target token embeddings."""
  names = {"auto": ("shared_embedding", "source_embedding"),
           "source": ("shared_embedding", "source_embedding"),
           "target": ("shared_embedding", "target_embedding")}[table]
  for name in names:
    if name in params:
      return np.asarray(params[name]["embedding"], np.float32)
  raise KeyError(f"no embedding table {names} in the params "
                 f"(top-level names: {sorted(params)})")


def word_pieces(tok: tokenizer_lib.Tokenizer, word: str) -> list[int]:
  """The word's piece ids (no eos); UnknownWordError if any piece is unk."""
  ids = [int(i) for i in tok.encode(word) if i != tokenizer_lib.EOS_ID]
  if not ids:
    raise UnknownWordError(f"{word!r} is empty after tokenisation")
  if tokenizer_lib.UNK_ID in ids:
    raise UnknownWordError(
        f"{word!r} is unknown to this vocabulary: it maps to "
        f"{[tok.id_to_piece(i) for i in ids]} (characters never seen in "
        "training)")
  return ids


def nearest(embeddings: np.ndarray, tok: tokenizer_lib.Tokenizer, word: str,
            k: int = 10) -> tuple[list[str], list[Neighbour]]:
  """(the word's pieces, its k nearest tokens by cosine similarity)."""
  ids = word_pieces(tok, word)
  query = embeddings[ids].mean(axis=0)
  norms = np.linalg.norm(embeddings, axis=1) * np.linalg.norm(query)
  similarity = embeddings @ query / np.maximum(norms, 1e-12)
  excluded = set(SPECIAL_IDS) | set(ids)
  similarity[list(excluded)] = -np.inf
  vocab = min(tok.vocab_size, embeddings.shape[0])
  similarity = similarity[:vocab]
  order = np.argsort(-similarity, kind="stable")[:max(0, min(k, vocab -
                                                            len(excluded)))]
  return ([tok.id_to_piece(i) for i in ids],
          [Neighbour(int(i), tok.id_to_piece(int(i)), float(similarity[i]))
           for i in order])


def _define_flags(fv: flags.FlagValues):
  d = dict(flag_values=fv)
  cli.define_model_flags(fv)
  flags.DEFINE_string("nearest", None, "The word to look up.", **d)
  flags.DEFINE_integer("k", 10, "How many neighbours.", **d)
  flags.DEFINE_enum("table", "auto", ["auto", "source", "target"],
                    "Which embedding table (auto: the shared one).", **d)


def main(argv: Sequence[str]) -> int:
  f = cli.parse_flags(_define_flags, argv, __doc__)
  if f.nearest is None:
    raise cli.UsageError("--nearest is required: the word to look up")
  if f.k < 1:
    raise cli.UsageError(f"--k={f.k}: ask for at least 1 neighbour")
  loaded = inference.load(*cli.model_choice(f))
  embeddings = embedding_table(loaded.params, f.table)
  try:
    pieces, neighbours = nearest(embeddings, loaded.tokenizer, f.nearest, f.k)
  except UnknownWordError as e:
    print(f"unknown word: {e.args[0]}")
    return 1
  how = ("one piece" if len(pieces) == 1 else
         f"mean of {len(pieces)} pieces")
  print(f"{f.nearest!r} = {' '.join(pieces)} ({how}); step "
        f"{loaded.steps[0]}; nearest {len(neighbours)} by cosine similarity:")
  width = max([len(n.piece) for n in neighbours] + [5])
  for rank, n in enumerate(neighbours, start=1):
    print(f"{rank:3d}  {n.piece:<{width}}  {n.similarity:+.4f}  (id {n.id})")
  return 0


if __name__ == "__main__":
  sys.exit(cli.run_command(main, sys.argv))
