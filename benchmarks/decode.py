"""Decoding speed: verses/s of greedy and beam-4 search, and the KV cache's gain.

    python -m benchmarks.decode [--workdir=<trained run>] [--num_verses=1063]
        [--batch_size=64] [--recompute_verses=64] [--repeats=3]
        [--methods=greedy,greedy_all_rows,greedy_at_growth,greedy_one_loop,
                   beam4,beam4_all_rows,beam4_at_growth,beam4_one_loop,
                   greedy_device,beam4_device]
    python -m benchmarks.decode --workdir=<trained run> --ctranslate2 [--repeats=3]
        [--devices=1,2]

With --ctranslate2: the same weights exported to CTranslate2
(``train.export``), decoded by it in float32 and int8 beside this project's
search, on the same verses in the same length-sorted batches, greedy and beam
4 (alpha 0.6); each repetition times every system once, in turn, and the
table gives medians, ratios against CTranslate2 float32, and each row's BLEU.
CTranslate2 runs with intra_threads = the cores, inter_threads = 1. With
--devices=1,2 (the default) this project's search also runs on two host
devices, one batch each at a time (``train.translation.decode_ids``, what
evaluate and translate do on a CPU by default), and CTranslate2 likewise
with two workers of one thread each (inter_threads = 2, intra_threads = 1,
the batches submitted asynchronously): both systems' best use of the cores.

Decodes the `bible_es_en` test split (1,063 verses) with the workdir's model,
params and tokenizer if --workdir is given, else with random params of the
`small` preset (noted in the output; a random model rarely emits eos, so
every output runs to its length limit of source + 50 tokens: a worst case).
Without a workdir the verses are tokenised with --tokenizer (a SentencePiece
model) if given, else replaced by synthetic sources of the same length
distribution (noted).
Each method decodes every batch once untimed (compiling each cache length
and batch size it reaches), then each of --repeats repetitions times every
method once, in turn; the table gives medians. ``*_all_rows`` is the same
search keeping the rows that have ended in the batch to its end (no
compaction between segments), ``*_at_growth`` the same search looking for
ended rows only where the cache grows (not every ``decoding.COMPACT_EVERY``
steps), ``*_one_loop`` the same search in one loop over a cache of the
batch's whole limit (the form before caches grew to the filled length),
``*_device`` (only when named) the whole search as one jitted program, as
it runs on an accelerator: same tokens, side by side.
The cache ratio compares greedy search with the KV cache against greedy
search recomputing the decoder over the whole prefix at every step, on the
first --recompute_verses verses (same batches, same tokens).

Prints one JSON object per line, then a table with the goals on the 2-core
CPU machine (beam 4 >= 150 verses/s, greedy >= 500 verses/s, cache >= 5x).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import numpy as np

from benchmarks.common import device_counts, emit, machine, table
from model import TransformerConfig, decoding, init_params
from train import inference
from train.checkpointing import CheckpointNotFoundError
from train.translation import DecodeOptions, decode_ids, make_batches, truncate

GOALS = {"greedy": 500.0, "beam4": 150.0, "cache_speedup": 5.0}


def test_sources(args, notes, trained=None):
  """(token id arrays, model config, params) of the test split.

  args: workdir, checkpoint, tokenizer, data_dir (see this module's flags);
  notes: a list that receives what was used (trained or random params, ...);
  trained: a dict that receives the loaded model and the references when
  --workdir is given.
  """
  if args.workdir:
    loaded = inference.load(args.workdir,
                            inference.parse_checkpoint(args.checkpoint))
    if trained is not None:
      trained["loaded"] = loaded
    from train import input_pipeline  # pylint: disable=import-outside-toplevel
    data = loaded.experiment_config.data
    ev = input_pipeline.make_eval_data(data, loaded.tokenizer, 1, split="test",
                                       process_index=0, process_count=1)
    ids = [truncate(x, data.max_len)
           for x in loaded.tokenizer.encode_batch(ev.sources)]
    if trained is not None:
      trained["references"] = ev.references
    notes.append(f"trained params: {args.workdir} step {loaded.steps[0]}")
    return ids, loaded.model_config, loaded.params
  tok = None
  if args.tokenizer:
    import tokenizer  # pylint: disable=import-outside-toplevel
    tok = tokenizer.load(args.tokenizer)
  config = TransformerConfig.preset(
      "small", vocab_size=tok.vocab_size if tok else 8000)
  params = jax.jit(init_params, static_argnums=0)(config, jax.random.key(0))
  notes.append("random params (small preset): outputs run to the length "
               "limit, a worst case")
  ids = None
  if tok is not None:
    try:
      from experiments.configs import data_config  # pylint: disable=import-outside-toplevel
      from train.datasets import sources  # pylint: disable=import-outside-toplevel
      data = data_config()
      if args.data_dir:
        data.data_dir = args.data_dir
      source = sources.get_source(data, "test")
      texts = [p["src"] for p in source.get_many(range(len(source)))]
      ids = [truncate(x, data.max_len) for x in tok.encode_batch(texts)]
      notes.append(f"bible_es_en test split tokenised by {args.tokenizer}")
    except Exception as e:  # pylint: disable=broad-except
      notes.append(f"bible_es_en not available ({type(e).__name__}: {e})")
  if ids is None:
    # Spanish verses: ~22.6 words, ~33 tokens with an 8k vocabulary.
    rng = np.random.RandomState(0)
    lengths = np.clip(rng.normal(33, 14, 1063).round(), 4, 128).astype(int)
    ids = [np.concatenate([rng.randint(3, config.vocab_size, n - 1), [1]])
           .astype(np.int32) for n in lengths]
    notes.append("synthetic sources with the test split's length "
                 "distribution (mean 33 tokens)")
  return ids, config, params


def add_source_flags(parser) -> None:
  """The flags ``test_sources`` reads: --workdir, --checkpoint, --tokenizer,
  --data_dir."""
  parser.add_argument("--workdir", default="")
  parser.add_argument("--checkpoint", default="latest")
  parser.add_argument("--tokenizer", default="")
  parser.add_argument("--data_dir", default="")


def load_test_sources(parser, args, notes, trained=None):
  """``test_sources``, a --workdir without a checkpoint a usage error (exit 2)."""
  try:
    return test_sources(args, notes, trained)
  except CheckpointNotFoundError as e:
    parser.error(str(e))


def compare_ctranslate2(loaded, ids, references, args) -> None:
  """Times and scores this project's searches against CTranslate2's."""
  import os  # pylint: disable=import-outside-toplevel
  import tempfile  # pylint: disable=import-outside-toplevel
  import ctranslate2  # pylint: disable=import-outside-toplevel
  from train import evaluate, export  # pylint: disable=import-outside-toplevel

  config, params, tok = loaded.model_config, loaded.params, loaded.tokenizer
  piece_ids = {tok.id_to_piece(i): i for i in range(tok.vocab_size)}
  batches = make_batches(ids, args.batch_size, config.max_len)
  export_dir = export.export_ctranslate2(loaded, tempfile.mkdtemp())
  cores = os.cpu_count() or 1
  workers = [n for n in args.devices if n > 1]   # the parallel settings
  translators = {(kind, 1): ctranslate2.Translator(
      str(export_dir), compute_type=kind, intra_threads=cores, inter_threads=1)
                 for kind in ("float32", "int8")}
  for n in workers:
    translators.update({(kind, n): ctranslate2.Translator(
        str(export_dir), compute_type=kind, intra_threads=max(1, cores // n),
        inter_threads=n) for kind in ("float32", "int8")})

  def ours(beam, devices):
    options = DecodeOptions(method="beam" if beam else "greedy", beam_size=4,
                            alpha=0.6, batch_size=args.batch_size)
    return lambda: decode_ids(config, params, ids, options, devices)

  def theirs(kind, beam, n_workers):
    def run():
      out = [[] for _ in ids]
      pending = []
      for chunk, _ in batches:
        pieces = [[tok.id_to_piece(int(t)) for t in ids[i]] for i in chunk]
        longest = max(len(p) for p in pieces)
        results = translators[kind, n_workers].translate_batch(
            pieces, beam_size=4 if beam else 1, length_penalty=0.6,
            min_decoding_length=1,
            max_decoding_length=min(longest + 49, config.max_len - 1),
            max_batch_size=args.batch_size, asynchronous=n_workers > 1)
        pending.append((chunk, results))
      for chunk, results in pending:
        for i, r in zip(chunk, results):
          r = r.result() if n_workers > 1 else r
          out[i] = [piece_ids[p] for p in r.hypotheses[0]]
      return out
    return run

  systems = {}
  # Each device compiles its own programs, and which device decodes which
  # batch changes from pass to pass (the next free one takes the next
  # batch): before the first pass every device decodes every batch once,
  # alone, so that no timed pass of several devices compiles.
  warm_ups = []
  for beam in (False, True):
    search = "beam4" if beam else "greedy"
    for n in args.devices:
      on = "" if n == 1 else f" {n} devices"
      devices = jax.local_devices()[:n]
      systems[f"ours{on} {search}"] = ours(beam, devices)
      if n > 1:
        warm_ups += [ours(beam, [device]) for device in devices]
    for kind in ("float32", "int8"):
      systems[f"ctranslate2 {kind} {search}"] = theirs(kind, beam, 1)
      for n in workers:
        systems[f"ctranslate2 {kind} {n} workers {search}"] = theirs(
            kind, beam, n)
  for warm_up in warm_ups:
    warm_up()
  outputs = {name: run() for name, run in systems.items()}  # warm-up/compile
  times = {name: [] for name in systems}
  for _ in range(args.repeats):
    for name, run in systems.items():
      start = time.perf_counter()
      run()
      times[name].append(time.perf_counter() - start)
  rows = []
  for name in systems:
    seconds = statistics.median(times[name])
    search = name.split()[-1]
    base = statistics.median(times[f"ctranslate2 float32 {search}"])
    hyps = tok.decode_batch(outputs[name])
    scores = evaluate.score(hyps, references)
    tokens = sum(len(o) + 1 for o in outputs[name])
    rows.append(emit(dict(
        machine(), benchmark="decode_vs_ctranslate2", system=name,
        verses=len(ids), batch_size=args.batch_size, seconds=round(seconds, 2),
        verses_per_s=round(len(ids) / seconds, 1),
        output_tokens_per_s=round(tokens / seconds, 1),
        speed_vs_ct2_float32=round(base / seconds, 2),
        bleu=round(scores["bleu"], 2), repeats=args.repeats)))
  print()
  print(table(rows, ["system", "verses", "seconds", "verses_per_s",
                     "output_tokens_per_s", "speed_vs_ct2_float32", "bleu"]))


def _time_alternating(fns, batches, repeats: int):
  """{name: (median seconds, output tokens)} of each fn(src) over batches.

  Every fn decodes every batch once untimed (compiling), then each
  repetition times every fn once, in turn: on a shared machine, methods
  compared in one run see the same load.
  """
  times = {name: [] for name in fns}
  tokens = {}
  for repeat in range(repeats + 1):
    for name, fn in fns.items():
      start, count = time.perf_counter(), 0
      for _, src in batches:
        out = np.asarray(fn(src))
        count += int(sum(len(x) + 1 for x in decoding.strip_special(out)))
      if repeat:  # the first pass compiles
        times[name].append(time.perf_counter() - start)
      tokens[name] = count
  return {name: (statistics.median(times[name]), tokens[name])
          for name in fns}


# The searches timed, by --methods name: the default, over caches that grow
# to the filled length and dropping ended rows between segments; the same
# keeping every row to the end (``*_all_rows``); the same checking for ended
# rows only where the cache grows (``*_at_growth``, the form before
# ``decoding.COMPACT_EVERY``); and the one-loop form over a cache of the
# batch's whole limit (the implementation before all three, same tokens),
# side by side; ``*_device`` is decoding's device mode (one jitted program a
# batch, the default off a CPU; here only when --methods names it). On an
# accelerator every other name runs the device mode too (``mode="auto"``). Each takes the decoding module it runs (``model.decoding``
# here; benchmarks.decode_ab passes another checkout's too).
SEARCHES = {
    "greedy": lambda d, c, p, src: d.greedy_search(c, p, src),
    "greedy_all_rows": lambda d, c, p, src: d.greedy_search(
        c, p, src, compact_rows=False),
    "greedy_at_growth": lambda d, c, p, src: d.greedy_search(
        c, p, src, compact_every=0),
    "greedy_one_loop": lambda d, c, p, src: d.greedy_search(
        c, p, src, grow_cache=False),
    "beam4": lambda d, c, p, src: d.beam_search(
        c, p, src, beam_size=4, alpha=0.6).sequences[:, 0],
    "beam4_all_rows": lambda d, c, p, src: d.beam_search(
        c, p, src, beam_size=4, alpha=0.6, compact_rows=False).sequences[:, 0],
    "beam4_at_growth": lambda d, c, p, src: d.beam_search(
        c, p, src, beam_size=4, alpha=0.6, compact_every=0).sequences[:, 0],
    "beam4_one_loop": lambda d, c, p, src: d.beam_search(
        c, p, src, beam_size=4, alpha=0.6, grow_cache=False).sequences[:, 0],
    "greedy_device": lambda d, c, p, src: d.greedy_search(
        c, p, src, mode="device"),
    "beam4_device": lambda d, c, p, src: d.beam_search(
        c, p, src, beam_size=4, alpha=0.6, mode="device").sequences[:, 0],
}
# Run unless --methods names them: the accelerator's form on this CPU.
DEFAULT_METHODS = [name for name in SEARCHES if not name.endswith("_device")]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  add_source_flags(parser)
  parser.add_argument("--num_verses", type=int, default=1063)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--recompute_verses", type=int, default=64)
  parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                      help="comma-separated: " + ", ".join(SEARCHES))
  parser.add_argument("--ctranslate2", action="store_true",
                      help="compare with CTranslate2 on the same weights")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--devices", default="1,2",
                      help="with --ctranslate2: host device counts to run "
                           "this project's search on (and CTranslate2 "
                           "worker counts)")
  args = parser.parse_args()
  args.devices = device_counts(parser, args.devices)
  if args.ctranslate2 and max(args.devices) > 1:  # before JAX's backend starts
    jax.config.update("jax_num_cpu_devices", max(args.devices))

  if args.repeats < 1:
    parser.error("--repeats: at least 1 timed pass")
  if args.ctranslate2 and not args.workdir:
    parser.error("--ctranslate2 needs --workdir (a trained run)")
  notes: list[str] = []
  trained: dict = {}
  ids, config, params = load_test_sources(parser, args, notes, trained)
  if args.ctranslate2:
    compare_ctranslate2(trained["loaded"], ids[:args.num_verses],
                        trained["references"][:args.num_verses], args)
    return
  ids = ids[:args.num_verses]
  batches = make_batches(ids, args.batch_size, config.max_len)
  common = dict(machine(), batch_size=args.batch_size,
                d_model=config.d_model, vocab=config.vocab_size)
  rows = []

  def record(name, verses, seconds, tokens, **extra):
    row = emit(dict(common, benchmark="decode", method=name, verses=verses,
                    seconds=round(seconds, 3),
                    verses_per_s=round(verses / seconds, 1),
                    output_tokens_per_s=round(tokens / seconds, 1), **extra))
    rows.append(row)
    return row

  methods = args.methods.split(",")
  unknown = set(methods) - set(SEARCHES)
  if unknown:
    parser.error(f"--methods: unknown {sorted(unknown)}; choose from "
                 f"{list(SEARCHES)}")
  timed = _time_alternating(
      {name: functools.partial(SEARCHES[name], decoding, config, params)
       for name in methods}, batches, args.repeats)
  for name in methods:
    record(name, len(ids), *timed[name], goal=GOALS[name.split("_")[0]],
           repeats=args.repeats)
  if args.recompute_verses > 0:
    subset = make_batches(ids[:args.recompute_verses], args.batch_size,
                          config.max_len)
    n = sum(len(chunk) for chunk, _ in subset)
    subset_timed = _time_alternating({
        "cached": lambda src: decoding.greedy_search(config, params, src),
        "recomputed": lambda src: decoding.greedy_search(
            config, params, src, use_cache=False)}, subset, repeats=1)
    cached = record("greedy_cached_subset", n, *subset_timed["cached"])
    recomputed = record("greedy_recomputed_subset", n,
                        *subset_timed["recomputed"])
    emit(dict(common, benchmark="decode", method="cache_speedup",
              ratio=round(recomputed["seconds"] / cached["seconds"], 2),
              goal=GOALS["cache_speedup"]))
    rows.append({"method": "cache_speedup (x)",
                 "verses_per_s": round(recomputed["seconds"] /
                                       cached["seconds"], 2),
                 "goal": GOALS["cache_speedup"]})
  for note in notes:
    emit({"benchmark": "decode", "note": note})
  print()
  print(table(rows, ["method", "verses", "seconds", "verses_per_s",
                     "output_tokens_per_s", "goal"]))
  for note in notes:
    print(f"note: {note}")


if __name__ == "__main__":
  main()
