"""The user's own parallel text: happy paths and every bad-input error."""

import numpy as np
import pytest

import tokenizer
from train import input_pipeline
from train.datasets import parallel_text, sources
from train.datasets.parallel_text import ParallelTextError, read_parallel_text
from experiments import configs
from train.batches import BATCH_KEYS


def write(path, data):
  path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
  return str(path)


def test_two_files_with_empty_lines_skipped_and_counted(tmp_path, caplog):
  src = write(tmp_path / "a.es", "uno\ndos\n\ncuatro\r\ncinco\n")
  tgt = write(tmp_path / "a.en", "one\n  \nthree\nfour\r\nfive\n")
  with caplog.at_level("WARNING"):
    pairs = read_parallel_text(src_path=src, tgt_path=tgt)
  assert pairs.src == ["uno", "cuatro", "cinco"]
  assert pairs.tgt == ["one", "four", "five"]
  assert pairs.num_empty_skipped == 2 and pairs.empty_line_numbers == [2, 3]
  assert "skipped 2 line(s)" in caplog.text


def test_mismatched_line_counts_name_both_files_and_counts(tmp_path):
  src = write(tmp_path / "a.es", "uno\ndos\ntres\n")
  tgt = write(tmp_path / "a.en", "one\ntwo\n")
  with pytest.raises(ParallelTextError) as err:
    read_parallel_text(src_path=src, tgt_path=tgt)
  message = str(err.value)
  assert f"{src} has 3 lines" in message and f"{tgt} has 2 lines" in message


def test_invalid_utf8_names_file_and_line(tmp_path):
  src = write(tmp_path / "a.es", "uno\ndos\n".encode() + "tr\xe9s\n".encode("latin1"))
  tgt = write(tmp_path / "a.en", "one\ntwo\nthree\n")
  with pytest.raises(ParallelTextError, match=rf"{src}:3: invalid UTF-8"):
    read_parallel_text(src_path=src, tgt_path=tgt)


def test_tsv_reads_and_malformed_line_names_file_and_line(tmp_path):
  good = write(tmp_path / "good.tsv", "uno\tone\n\t\ndos\ttwo\n")
  pairs = read_parallel_text(tsv_path=good)
  assert (pairs.src, pairs.tgt, pairs.num_empty_skipped) == (
      ["uno", "dos"], ["one", "two"], 1)
  bad = write(tmp_path / "bad.tsv", "uno\tone\ndos\ttwo\textra\n")
  with pytest.raises(ParallelTextError, match=rf"{bad}:2: expected exactly 2.*found 3"):
    read_parallel_text(tsv_path=bad)
  no_tab = write(tmp_path / "notab.tsv", "uno one\n")
  with pytest.raises(ParallelTextError, match=rf"{no_tab}:1: .*found 1"):
    read_parallel_text(tsv_path=no_tab)


def test_missing_file_and_wrong_arguments(tmp_path):
  with pytest.raises(ParallelTextError, match="not found"):
    read_parallel_text(tsv_path=str(tmp_path / "nope.tsv"))
  with pytest.raises(ParallelTextError, match="Give either"):
    read_parallel_text(src_path=str(tmp_path / "a"))


def test_parallel_text_through_the_pipeline(tmp_path):
  es = [f"el hombre número {i} anda por la casa" for i in range(40)]
  en = [f"the man number {i} walks through the house" for i in range(40)]
  config = configs.data_config()
  config.name = "parallel_text"
  config.train_src_file = write(tmp_path / "train.es", "\n".join(es) + "\n")
  config.train_tgt_file = write(tmp_path / "train.en", "\n".join(en) + "\n")
  config.eval_tsv_file = write(
      tmp_path / "dev.tsv", "".join(f"{s}\t{t}\n" for s, t in zip(es[:5], en[:5])))
  config.vocab_size = 60
  config.max_len = 32
  train = sources.get_source(config, "train")
  assert len(train) == 40 and train[3] == {"src": es[3], "tgt": en[3]}
  tok = input_pipeline.train_or_load_tokenizer(config, str(tmp_path / "work"))
  batch = next(input_pipeline.make_train_iterator(config, tok, 4))
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      k: ((4, 32), np.int32) for k in BATCH_KEYS}
  ev = input_pipeline.make_eval_data(config, tok, 4)
  assert ev.sources == es[:5] and ev.references == en[:5] and ev.num_batches == 2


def test_empty_training_files_fail_clearly(tmp_path):
  config = configs.data_config()
  config.name = "parallel_text"
  config.train_tsv_file = write(tmp_path / "empty.tsv", "\t\n")
  with pytest.raises(tokenizer.EmptyTrainingTextError):
    input_pipeline.train_or_load_tokenizer(config, str(tmp_path / "work"))
