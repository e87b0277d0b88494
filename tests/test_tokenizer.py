"""tokenizer/: train, save, load, encode/decode, special ids, errors."""

import numpy as np
import pytest

import tokenizer
from experiments import configs

SENTENCES = [
    "EN el principio crió Dios los cielos y la tierra.",
    "In the beginning, God created the heavens and the earth.",
    "Y la tierra estaba desordenada y vacía.",
    "The earth was formless and empty.",
    "Y dijo Dios: Sea la luz: y fué la luz.",
    "God said, “Let there be light,” and there was light.",
] * 20


@pytest.fixture(scope="module")
def small_tokenizer():
  return tokenizer.train(SENTENCES, vocab_size=120, seed=0)


def test_special_ids(small_tokenizer):
  tok = small_tokenizer
  assert (tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2)
  assert tok.id_to_piece(0) == "<pad>" and tok.id_to_piece(1) == "</s>"
  assert 50 < tok.vocab_size <= 120


def test_encode_appends_eos_and_round_trips(small_tokenizer):
  tok = small_tokenizer
  ids = tok.encode_batch(SENTENCES[:6])
  for text, seq in zip(SENTENCES[:6], ids):
    assert seq.dtype == np.int32 and seq[-1] == tok.eos_id
    assert tok.eos_id not in seq[:-1] and tok.pad_id not in seq
  assert tok.decode_batch(ids) == SENTENCES[:6]


def test_decode_stops_at_eos_and_ignores_pad(small_tokenizer):
  tok = small_tokenizer
  a, b = tok.encode_batch(SENTENCES[:2])
  row = np.zeros(80, np.int32)
  row[2:2 + len(a)] = a  # leading pads, then eos, then garbage
  row[2 + len(a):2 + len(a) + len(b)] = b
  assert tok.decode_batch(row[None]) == [SENTENCES[0]]
  assert tok.decode(list(a[:-1])) == SENTENCES[0]  # no eos at all


def test_empty_training_text_fails_clearly():
  with pytest.raises(tokenizer.EmptyTrainingTextError, match="training text is empty"):
    tokenizer.train(["", "   "], vocab_size=100)


def test_save_load_and_train_or_load(tmp_path, small_tokenizer):
  path = tokenizer.save(small_tokenizer, tokenizer.model_path(str(tmp_path)))
  assert path == tmp_path / "tokenizer" / "spm.model"
  loaded = tokenizer.load(path)
  assert loaded.encode("Sea la luz.").tolist() == small_tokenizer.encode("Sea la luz.").tolist()

  config = configs.data_config()
  config.vocab_size = 120
  calls = []

  def texts():
    calls.append(1)
    return SENTENCES

  work = tmp_path / "run"
  first = tokenizer.train_or_load(config, str(work), texts)
  second = tokenizer.train_or_load(config, str(work), texts)
  assert calls == [1]  # the second call loads the saved model
  assert first.model_proto == second.model_proto
  with pytest.raises(FileNotFoundError, match="No SentencePiece model"):
    tokenizer.load(tmp_path / "nowhere" / "spm.model")


def test_bible_tokenizer(bible_tokenizer, bible_config):
  assert bible_tokenizer.vocab_size == bible_config.vocab_size
  text = "Y dijo Dios: Sea la luz: y fué la luz."
  assert bible_tokenizer.decode(bible_tokenizer.encode(text)) == text


def test_byte_fallback_loses_no_character(bible_tokenizer):
  # The run's tokenizer (data.spm_byte_fallback): an emoji never seen in
  # training becomes UTF-8 byte pieces, not <unk>, and decodes back.
  text = "Y dijo Dios \U0001F600 sea la luz \u2603."
  ids = bible_tokenizer.encode(text)
  assert tokenizer.UNK_ID not in ids
  assert bible_tokenizer.decode(ids) == text
  assert bible_tokenizer.unknown_characters(text) == []


def test_small_vocabularies_turn_byte_fallback_off_and_name_unknowns():
  tok = tokenizer.train(SENTENCES, vocab_size=120, byte_fallback=True)
  assert tok.vocab_size <= 120
  assert tok.unknown_characters("luz \U0001F600 luz") == ["\U0001F600"]
