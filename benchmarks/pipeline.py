"""Input-pipeline benchmark: split sizes, tokenizer training time, pack
efficiency and steady-state target tokens/s, on one core.

    python -m benchmarks.pipeline [--data_dir=/tmp/tfds] [--workdir=/tmp/bench]
        [--batch_size=64] [--warmup_batches=20] [--batches=100]

Prints one JSON object per line, then a short table. The process is pinned
to one CPU (os.sched_setaffinity) so the figure is per core.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np



def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data_dir", default="")
  parser.add_argument("--workdir", default="")
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--warmup_batches", type=int, default=20)
  parser.add_argument("--batches", type=int, default=100)
  parser.add_argument("--cores", type=int, default=1)
  args = parser.parse_args()
  if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.cores])

  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  import tokenizer  # pylint: disable=import-outside-toplevel
  import train.datasets  # noqa: F401  pylint: disable=import-outside-toplevel
  from experiments import configs  # pylint: disable=import-outside-toplevel
  from train import input_pipeline  # pylint: disable=import-outside-toplevel

  results = []

  def emit(**record):
    print(json.dumps(record), flush=True)
    results.append(record)

  config = configs.data_config()
  config.data_dir = args.data_dir or tempfile.mkdtemp(prefix="bench_tfds_")
  start = time.perf_counter()
  sizes = {
      split: len(tfds.data_source("bible_es_en", split=split, data_dir=config.data_dir))
      for split in ("train", "validation", "test")
  }
  emit(metric="split_sizes", **sizes, build_or_open_s=round(time.perf_counter() - start, 2))

  workdir = args.workdir or tempfile.mkdtemp(prefix="bench_work_")
  shutil.rmtree(tokenizer.model_path(workdir).parent, ignore_errors=True)
  start = time.perf_counter()
  texts = input_pipeline.tokenizer_training_text(config)
  read_s = time.perf_counter() - start
  start = time.perf_counter()
  tok = tokenizer.train(
      texts, vocab_size=config.vocab_size, model_type=config.spm_model_type,
      character_coverage=config.spm_character_coverage,
      max_sentences=config.spm_max_sentences, seed=config.seed)
  emit(metric="tokenizer_training", seconds=round(time.perf_counter() - start, 2),
       read_text_s=round(read_s, 2), sentences=len(texts), vocab_size=tok.vocab_size)

  it = input_pipeline.make_train_iterator(config, tok, args.batch_size)
  for _ in range(args.warmup_batches):
    next(it)
  start = time.perf_counter()
  batches = [next(it) for _ in range(args.batches)]
  seconds = time.perf_counter() - start
  tgt_tokens = sum(int(np.count_nonzero(b["tgt_segment_ids"])) for b in batches)
  pairs = sum(int(b["tgt_segment_ids"].max(axis=1).sum()) for b in batches)
  emit(metric="train_pipeline", cores=args.cores, batch_rows=args.batch_size,
       max_len=config.max_len, batches=args.batches,
       tgt_tokens_per_s=round(tgt_tokens / seconds),
       pairs_per_s=round(pairs / seconds), pairs_per_row=round(pairs / (args.batches * args.batch_size), 2))
  eff = input_pipeline.pack_efficiency(batches)
  emit(metric="pack_efficiency", src=round(eff["src"], 4), tgt=round(eff["tgt"], 4))

  print()
  print(f"{'split sizes (train/validation/test)':40s} {sizes['train']} / {sizes['validation']} / {sizes['test']}")
  print(f"{'tokenizer training (8k unigram)':40s} {results[1]['seconds']:.1f} s")
  print(f"{'pack efficiency src / tgt':40s} {eff['src']:.3f} / {eff['tgt']:.3f}")
  print(f"{'target tokens/s, ' + str(args.cores) + ' core(s)':40s} {results[2]['tgt_tokens_per_s']}")


if __name__ == "__main__":
  main()
