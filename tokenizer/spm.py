"""`Tokenizer`: a SentencePiece model with the project's fixed special ids.

Ids: pad = 0, eos = 1, unk = 2; no bos (SentencePiece's bos_id = -1): the
decoder starts from pad, which the model's shift-right inserts.
`encode_batch` appends eos to every sequence; `decode_batch` stops at the
first eos and ignores pad.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
BOS_ID = -1  # disabled


class Tokenizer:
  """Joint source/target SentencePiece tokenizer.

  Attributes:
    vocab_size: number of ids, including pad, eos and unk.
    pad_id, eos_id, unk_id: 0, 1, 2.
    model_proto: the serialized model (bytes), as saved in spm.model.
    fingerprint: 16 hex digits of its sha256.
  """

  pad_id = PAD_ID
  eos_id = EOS_ID
  unk_id = UNK_ID

  def __init__(self, model_proto: bytes):
    self.model_proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    ids = (self._sp.pad_id(), self._sp.eos_id(), self._sp.unk_id())
    if ids != (PAD_ID, EOS_ID, UNK_ID):
      raise ValueError(
          f"SentencePiece model has pad/eos/unk ids {ids}, expected "
          f"{(PAD_ID, EOS_ID, UNK_ID)}; retrain it with tokenizer.train()."
      )

  @property
  def fingerprint(self) -> str:
    """16 hex digits of the sha256 of the serialized model: what a cache of
    ids or a checkpoint records to know which tokenizer made its ids."""
    return hashlib.sha256(self.model_proto).hexdigest()[:16]

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def encode(self, text: str) -> np.ndarray:
    """One string -> int32 ids `[length]`, ending with eos."""
    return self.encode_batch([text])[0]

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    """Strings -> list of int32 id arrays `[length_i]`, each ending with eos."""
    encoded = self._sp.encode(list(texts), out_type=int, add_eos=True)
    return [np.asarray(ids, dtype=np.int32) for ids in encoded]

  def unknown_characters(self, text: str) -> list[str]:
    """The characters of `text` that encode to `<unk>` (in order, once each)."""
    if UNK_ID not in self.encode(text):
      return []
    return [c for c in dict.fromkeys(text)
            if not c.isspace() and UNK_ID in self.encode(c)]

  def decode(self, ids: Iterable[int]) -> str:
    return self.decode_batch([ids])[0]

  def decode_batch(self, batch_ids: Iterable[Iterable[int]]) -> list[str]:
    """Id sequences (lists or `[batch, length]` arrays) -> strings.

    Each sequence is cut at its first eos; pad ids are ignored.
    """
    out = []
    for ids in batch_ids:
      ids = [int(i) for i in np.asarray(ids).reshape(-1)]
      if EOS_ID in ids:
        ids = ids[: ids.index(EOS_ID)]
      out.append([i for i in ids if i != PAD_ID])
    return self._sp.decode(out) if out else []

  def id_to_piece(self, index: int) -> str:
    return self._sp.id_to_piece(int(index))

  def __repr__(self) -> str:
    return f"Tokenizer(vocab_size={self.vocab_size})"
