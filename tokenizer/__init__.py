"""SentencePiece tokenizer: train, save, load, encode, decode.

    from tokenizer import Tokenizer, train, save, load, train_or_load, model_path
    tok = train(sentences, vocab_size=8000)           # unigram by default
    save(tok, model_path(workdir))                    # <workdir>/tokenizer/spm.model
    ids = tok.encode_batch(["Hola."])                 # [array([..., 1], int32)]
    tok.decode_batch(ids)                             # ["Hola."]

Ids: pad = 0, eos = 1 (appended by encode), unk = 2, no bos.
This package imports nothing of `model` or `train`.
"""

from tokenizer.spm import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer
from tokenizer.training import (
    EmptyTrainingTextError,
    TokenizerFileError,
    load,
    model_path,
    save,
    train,
    train_or_load,
)

__all__ = [
    "BOS_ID", "EOS_ID", "PAD_ID", "UNK_ID", "Tokenizer", "EmptyTrainingTextError",
    "TokenizerFileError",     "load", "model_path", "save", "train", "train_or_load",
]
