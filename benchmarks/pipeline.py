"""Input-pipeline benchmark: training batches/s and pack efficiency from a
warm iterator (this checkout against another's, side by side), and the
one-time tokenization of a big corpus on 1 worker against 2.

    python -m benchmarks.pipeline [--data_dir=/tmp/tfds] [--workdir=/tmp/bench]
        [--batch_size=16] [--batches=3000] [--old_checkout=/work/main]
        [--old_batches=100] [--rounds=3] [--tokenize_pairs=1000000]

Prints one JSON object per line, then a short table:
- split_sizes, tokenizer_training (bible_es_en; the tokenizer is retrained);
- token_cache: building the train split's id cache (cold) and loading it;
- train_pipeline: one line per round and checkout: batches/s, target
  tokens/s and pack efficiency of `--batches` batches of `--batch_size` x
  max_len from a warm iterator (after `--warmup_batches`), each round in a
  fresh process pinned to one core, checkouts alternating; then
  train_pipeline_summary with the medians and the ratio;
- tokenize: a generated corpus of `--tokenize_pairs` pairs (verse pairs drawn
  at random from the Bible train split), both sides encoded to flat ids as the
  cache build does, with 1 and 2 worker processes and with SentencePiece's
  own 2 threads, alternating; then tokenize_summary (medians, speedups).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in a fresh process with PYTHONPATH=<checkout>: only the API that both
# the old and the new pipeline have (make_train_iterator, pack_efficiency).
_TIMING_CHILD = """
import json, os, sys, time
args = json.loads(sys.argv[1])
os.sched_setaffinity(0, [args["core"]])
import numpy as np
import tokenizer
from experiments import configs
from train import input_pipeline
config = configs.data_config()
config.data_dir = args["data_dir"]
tok = tokenizer.load(args["model"])
it = input_pipeline.make_train_iterator(config, tok, args["batch_size"],
                                        process_index=0, process_count=1)
for _ in range(args["warmup"]):
  next(it)
start = time.perf_counter()
batches = [next(it) for _ in range(args["batches"])]
seconds = time.perf_counter() - start
eff = input_pipeline.pack_efficiency(batches)
tgt = sum(int(np.count_nonzero(b["tgt_segment_ids"])) for b in batches)
print(json.dumps({"module": input_pipeline.__file__, "seconds": seconds,
                  "batches_per_s": args["batches"] / seconds,
                  "tgt_tokens_per_s": tgt / seconds,
                  "pack_efficiency_src": eff["src"],
                  "pack_efficiency_tgt": eff["tgt"]}))
"""


def _time_checkout(checkout: str, **child_args) -> dict:
  env = dict(os.environ, PYTHONPATH=checkout)
  proc = subprocess.run(
      [sys.executable, "-c", _TIMING_CHILD, json.dumps(child_args)],
      cwd=checkout, env=env, capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(f"timing {checkout} failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _spm_threads(model_proto: bytes, texts: list[str], threads: int):
  """SentencePiece's own threads, turned into the same flat arrays."""
  import itertools  # pylint: disable=import-outside-toplevel
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel
  sp = spm.SentencePieceProcessor(model_proto=model_proto)
  parts = []
  for i in range(0, len(texts), 1 << 16):
    out = sp.encode(texts[i:i + (1 << 16)], out_type=int, add_eos=True,
                    num_threads=threads)
    lengths = np.fromiter(map(len, out), np.int64, len(out))
    parts.append(np.fromiter(itertools.chain.from_iterable(out), np.int32,
                             int(lengths.sum())))
  return np.concatenate(parts)


def _cpu_seconds() -> dict[str, float]:
  """CPU seconds (user + system) of this process and of its ended children."""
  import resource  # pylint: disable=import-outside-toplevel
  own = resource.getrusage(resource.RUSAGE_SELF)
  children = resource.getrusage(resource.RUSAGE_CHILDREN)
  return {"self": own.ru_utime + own.ru_stime,
          "children": children.ru_utime + children.ru_stime}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data_dir", default="")
  parser.add_argument("--workdir", default="")
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--warmup_batches", type=int, default=20)
  parser.add_argument("--batches", type=int, default=3000)
  parser.add_argument("--old_checkout", default="",
                      help="another checkout to time side by side (the old code)")
  parser.add_argument("--old_batches", type=int, default=100)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--tokenize_pairs", type=int, default=1_000_000,
                      help="generated corpus size; 0 skips the tokenization part")
  parser.add_argument("--tokenize_rounds", type=int, default=2)
  parser.add_argument("--tokenize_variants", default="workers_1,workers_2,spm_threads_2")
  args = parser.parse_args()

  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  import tokenizer  # pylint: disable=import-outside-toplevel
  import train.datasets  # noqa: F401  pylint: disable=import-outside-toplevel
  from experiments import configs  # pylint: disable=import-outside-toplevel
  from train import input_pipeline, token_cache  # pylint: disable=import-outside-toplevel
  from train.datasets import sources  # pylint: disable=import-outside-toplevel

  def emit(**record):
    print(json.dumps(record), flush=True)

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
      max_sentences=config.spm_max_sentences, seed=config.seed,
      byte_fallback=config.spm_byte_fallback)
  model = tokenizer.save(tok, tokenizer.model_path(workdir))
  emit(metric="tokenizer_training", seconds=round(time.perf_counter() - start, 2),
       read_text_s=round(read_s, 2), sentences=len(texts), vocab_size=tok.vocab_size)

  source = sources.get_source(config, config.train_split)
  path = token_cache.cache_path(config, tok, source)
  path.unlink(missing_ok=True)
  start = time.perf_counter()
  token_cache.load_or_build(config, tok, source)
  build_s = time.perf_counter() - start
  start = time.perf_counter()
  token_cache.load_or_build(config, tok, source)
  emit(metric="token_cache", split=config.train_split, pairs=len(source),
       build_s=round(build_s, 2), load_s=round(time.perf_counter() - start, 3),
       path=str(path))

  med = {}
  if args.rounds:
    core = sorted(os.sched_getaffinity(0))[0] if hasattr(os, "sched_getaffinity") else 0
    checkouts = [("new", ROOT, args.batches)]
    if args.old_checkout:
      checkouts.insert(0, ("old", os.path.abspath(args.old_checkout), args.old_batches))
    runs = {name: [] for name, _, _ in checkouts}
    for round_ in range(args.rounds):
      for name, checkout, batches in checkouts:
        r = _time_checkout(checkout, core=core, data_dir=config.data_dir,
                           model=str(model), batch_size=args.batch_size,
                           warmup=args.warmup_batches, batches=batches)
        runs[name].append(r)
        emit(metric="train_pipeline", checkout=name, round=round_, cores=1,
             batch_rows=args.batch_size, max_len=config.max_len, batches=batches,
             batches_per_s=round(r["batches_per_s"], 1),
             tgt_tokens_per_s=round(r["tgt_tokens_per_s"]),
             pack_efficiency_src=round(r["pack_efficiency_src"], 4),
             pack_efficiency_tgt=round(r["pack_efficiency_tgt"], 4),
             load_avg=round(os.getloadavg()[0], 2))
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "module"}
           for name, rs in runs.items()}
    summary = {f"{name}_{k}": round(v, 4 if "efficiency" in k else 1)
               for name, m in med.items() for k, v in m.items() if k != "seconds"}
    if "old" in med:
      summary["new_over_old_batches_per_s"] = round(
          med["new"]["batches_per_s"] / med["old"]["batches_per_s"], 1)
    emit(metric="train_pipeline_summary", rounds=args.rounds, **summary)

  if args.tokenize_pairs:
    rng = np.random.default_rng(0)
    pairs = source.get_many(range(len(source)))
    picks = rng.integers(0, len(pairs), args.tokenize_pairs)
    corpus = ([pairs[i]["src"] for i in picks] + [pairs[i]["tgt"] for i in picks])
    variants = {
        "workers_1": lambda: token_cache.encode_texts(tok.model_proto, corpus, 1)[0],
        "workers_2": lambda: token_cache.encode_texts(tok.model_proto, corpus, 2)[0],
        "spm_threads_2": lambda: _spm_threads(tok.model_proto, corpus, 2),
    }
    variants = {k: variants[k] for k in args.tokenize_variants.split(",")}
    times = {k: [] for k in variants}
    sizes_seen = set()
    for round_ in range(args.tokenize_rounds):
      for name, fn in variants.items():
        cpu = _cpu_seconds()
        start = time.perf_counter()
        ids = fn()
        times[name].append(time.perf_counter() - start)
        cpu = {k: v - cpu[k] for k, v in _cpu_seconds().items()}
        sizes_seen.add(len(ids))
        emit(metric="tokenize", variant=name, round=round_, pairs=args.tokenize_pairs,
             sentences=len(corpus), tokens=len(ids), seconds=round(times[name][-1], 2),
             cpu_s_this_process=round(cpu["self"], 2),
             cpu_s_workers=round(cpu["children"], 2),
             load_avg=round(os.getloadavg()[0], 2))
    assert len(sizes_seen) == 1, "the variants encoded differently"
    med_t = {k: statistics.median(v) for k, v in times.items()}
    emit(metric="tokenize_summary", pairs=args.tokenize_pairs, rounds=args.tokenize_rounds,
         **{f"{k}_s": round(v, 2) for k, v in med_t.items()},
         **{f"speedup_{k}": round(med_t["workers_1"] / v, 2)
            for k, v in med_t.items() if "workers_1" in med_t and k != "workers_1"})

  print()
  print(f"{'split sizes (train/validation/test)':44s} {sizes['train']} / {sizes['validation']} / {sizes['test']}")
  for name, m in med.items():
    print(f"{name + ' batches/s (1 core, ' + str(args.batch_size) + ' x ' + str(config.max_len) + ')':44s} "
          f"{m['batches_per_s']:.1f}  pack efficiency src/tgt "
          f"{m['pack_efficiency_src']:.3f} / {m['pack_efficiency_tgt']:.3f}")
  if args.tokenize_pairs and {"workers_1", "workers_2"} <= set(med_t):
    print(f"{'tokenize ' + str(args.tokenize_pairs) + ' pairs: 1 / 2 workers (s)':44s} "
          f"{med_t['workers_1']:.1f} / {med_t['workers_2']:.1f}  "
          f"({med_t['workers_1'] / med_t['workers_2']:.2f}x)")


if __name__ == "__main__":
  main()
