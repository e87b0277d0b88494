"""Train, save and load the joint SentencePiece model of a run.

The model lives at `<workdir>/tokenizer/spm.model` (`model_path(workdir)`),
beside the checkpoints. `train_or_load` loads it when present, otherwise
process 0 trains it and writes it atomically while other processes wait for
the file (multi-host runs share the workdir, e.g. on gs://).
"""

from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Callable, Iterable

import jax
import sentencepiece as spm
from etils import epath

from tokenizer import spm as spm_lib

TOKENIZER_DIR = "tokenizer"
# Byte fallback adds 256 pieces; smaller vocabularies leave it off.
MIN_BYTE_FALLBACK_VOCAB = 1024
MODEL_FILE = "spm.model"


class EmptyTrainingTextError(ValueError):
  """The tokenizer was asked to train on no text at all."""


class TokenizerFileError(ValueError):
  """A SentencePiece model file that does not load (damaged, not a model)."""


def model_path(workdir: str) -> epath.Path:
  """Where a run keeps its tokenizer: `<workdir>/tokenizer/spm.model`."""
  return epath.Path(workdir) / TOKENIZER_DIR / MODEL_FILE


def train(
    texts: Iterable[str],
    *,
    vocab_size: int = 8000,
    model_type: str = "unigram",
    character_coverage: float = 1.0,
    max_sentences: int = 1_000_000,
    seed: int = 0,
    byte_fallback: bool = False,
) -> spm_lib.Tokenizer:
  """Trains a SentencePiece model on `texts` (one sentence per item).

  `vocab_size` is an upper bound (hard_vocab_limit=False): a small corpus gets
  a smaller vocabulary instead of an error; read `Tokenizer.vocab_size`.
  `byte_fallback`: characters never seen in training are encoded as their
  UTF-8 bytes (256 byte pieces) instead of `<unk>`, so no input character is
  lost; below `MIN_BYTE_FALLBACK_VOCAB` there is no room for the byte pieces
  and it is turned off, with a warning.

  Raises:
    EmptyTrainingTextError: if `texts` holds no non-blank sentence.
  """
  sentences = [t for t in texts if t and t.strip()]
  if not sentences:
    raise EmptyTrainingTextError(
        "Cannot train the SentencePiece tokenizer: the training text is empty "
        "(no non-blank sentence in the training split). Check "
        "config.data.name / train_split, or the parallel_text training files."
    )
  if byte_fallback and vocab_size < MIN_BYTE_FALLBACK_VOCAB:
    logging.warning(
        "SentencePiece byte fallback off: a vocabulary of %d has no room for "
        "the 256 byte pieces (needs >= %d); unseen characters become <unk>.",
        vocab_size, MIN_BYTE_FALLBACK_VOCAB)
    byte_fallback = False
  spm.set_random_generator_seed(seed)
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences),
      model_writer=model,
      vocab_size=vocab_size,
      hard_vocab_limit=False,
      model_type=model_type,
      character_coverage=character_coverage,
      input_sentence_size=max_sentences,
      shuffle_input_sentence=True,
      pad_id=spm_lib.PAD_ID,
      eos_id=spm_lib.EOS_ID,
      unk_id=spm_lib.UNK_ID,
      bos_id=spm_lib.BOS_ID,
      byte_fallback=byte_fallback,
      num_threads=os.cpu_count() or 1,
      minloglevel=2,  # Keep SentencePiece's own progress log off stderr.
  )
  return spm_lib.Tokenizer(model.getvalue())


def save(tok: spm_lib.Tokenizer, path: str | os.PathLike) -> epath.Path:
  """Writes the model file atomically (temp file + rename)."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
  tmp.write_bytes(tok.model_proto)
  tmp.rename(path)
  return path


def load(path: str | os.PathLike) -> spm_lib.Tokenizer:
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(
        f"No SentencePiece model at {path}. Train one with "
        "tokenizer.train_or_load(config.data, workdir, texts)."
    )
  try:
    return spm_lib.Tokenizer(path.read_bytes())
  except (RuntimeError, ValueError, OSError) as e:
    # SentencePiece reports a damaged file as a RuntimeError of its parser.
    reason = (str(e).strip() or type(e).__name__).splitlines()[0][:160]
    if "ParseFromArray" in reason:
      reason = "its bytes do not parse"
    raise TokenizerFileError(
        f"{path} is damaged: it does not load as a SentencePiece model "
        f"({reason}). Put back the run's copy (its checkpoints were trained "
        "with its ids); in a workdir without checkpoints, delete it and "
        "train makes a new one"
    ) from None


def train_or_load(
    data_config,
    workdir: str,
    texts: Callable[[], Iterable[str]],
    *,
    wait_timeout_s: float = 1800.0,
) -> spm_lib.Tokenizer:
  """Loads `<workdir>/tokenizer/spm.model`, training it first if missing.

  Args:
    data_config: reads `vocab_size`, `spm_model_type`,
      `spm_character_coverage`, `spm_max_sentences`, `spm_byte_fallback`,
      `seed`.
    workdir: the run's directory (local or gs://).
    texts: called only when training is needed; returns the training
      sentences (source and target sides of the training split).
  """
  path = model_path(workdir)
  if path.exists():
    return load(path)
  if jax.process_index() == 0:
    start = time.perf_counter()
    tok = train(
        texts(),
        vocab_size=data_config.vocab_size,
        model_type=data_config.spm_model_type,
        character_coverage=data_config.spm_character_coverage,
        max_sentences=data_config.spm_max_sentences,
        seed=data_config.seed,
        byte_fallback=data_config.spm_byte_fallback,
    )
    save(tok, path)
    logging.info(
        "Trained SentencePiece (%s, %d pieces) in %.1fs -> %s",
        data_config.spm_model_type, tok.vocab_size,
        time.perf_counter() - start, path,
    )
    return tok
  deadline = time.monotonic() + wait_timeout_s
  while not path.exists():
    if time.monotonic() > deadline:
      raise TimeoutError(
          f"Process {jax.process_index()} waited {wait_timeout_s:.0f}s for "
          f"process 0 to write {path}; check process 0's log."
      )
    time.sleep(2.0)
  return load(path)
