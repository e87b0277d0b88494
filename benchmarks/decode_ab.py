"""A change to the searches against another checkout's, in one process.

    python -m benchmarks.decode_ab --against=<other checkout> [--workdir=<run>]
        [--methods=greedy,beam4 (or any of benchmarks.decode's)]
        [--num_verses=1063] [--batch_size=64] [--rounds=4]

Loads ``<other checkout>/model/decoding.py`` (or the package
``model/decoding/`` that replaced it) beside this checkout's
``model.decoding`` (the model, layers and everything else are this
checkout's: it compares changes to the searches alone) and decodes the
same length-sorted batches of the test split with both (``benchmarks.decode``'s
verses: the workdir's model and tokenizer, or random `small` params and
synthetic sources without --workdir). Both decode every batch once untimed
(compiling) and must give the same tokens; then each round times every
batch with each version in turn, the order alternating from batch to
batch, so both see the same moments of a shared machine's load. Whole runs
of ``benchmarks.decode`` from two checkouts, one after the other, differ
by 5-10% here from load alone; the per-round ratios of this one agree to
a few percent.

Prints one JSON object per method and round, then a table of the medians
and ratios (theirs / ours: above 1, this checkout is faster).
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import statistics
import sys
import time

import jax
import numpy as np

from benchmarks.common import emit, machine, table
from benchmarks.decode import SEARCHES, add_source_flags, load_test_sources
from model import decoding
from train.translation import make_batches


def load_decoding(path: pathlib.Path, name: str = "model.decoding_against"):
  """The module of another decoding.py, or the package of another
  decoding/ directory (its modules import each other relatively; their
  other imports resolve to this checkout's ``model`` package)."""
  if path.is_dir():
    spec = importlib.util.spec_from_file_location(
        name, path / "__init__.py", submodule_search_locations=[str(path)])
  else:
    spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


def compare(versions: dict, config, params, batches, method: str,
            rounds: int) -> dict:
  """{"same_tokens": bool, "seconds": {name: [a round's seconds, ...]}}.

  versions: {name: decoding module}; batches: src int32 arrays.
  """
  search = SEARCHES[method]
  outputs = {name: [np.asarray(search(d, config, params, src))
                    for src in batches]
             for name, d in versions.items()}   # compiles
  first, *others = outputs.values()
  same = all(np.array_equal(a, b) for other in others
             for a, b in zip(first, other))
  names = list(versions)
  seconds = {name: [] for name in names}
  for r in range(rounds):
    spent = dict.fromkeys(names, 0.0)
    for i, src in enumerate(batches):
      for name in (names if (i + r) % 2 == 0 else names[::-1]):
        start = time.perf_counter()
        jax.block_until_ready(search(versions[name], config, params, src))
        spent[name] += time.perf_counter() - start
    for name in names:
      seconds[name].append(spent[name])
  return {"same_tokens": same, "seconds": seconds}


def _decoding_path(path: pathlib.Path) -> pathlib.Path | None:
  """A decoding module file or package directory at or inside path."""
  for candidate in (path / "model" / "decoding", path / "model" / "decoding.py",
                    path):
    if candidate.is_dir() and (candidate / "__init__.py").is_file():
      return candidate
    if candidate.is_file() and candidate.suffix == ".py":
      return candidate
  return None


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--against", required=True,
                      help="another checkout (or its model/decoding.py or "
                           "model/decoding/)")
  add_source_flags(parser)
  parser.add_argument("--methods", default="greedy,beam4",
                      help="comma-separated: " + ", ".join(SEARCHES))
  parser.add_argument("--num_verses", type=int, default=1063)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--rounds", type=int, default=4)
  args = parser.parse_args()
  other = _decoding_path(pathlib.Path(args.against))
  if other is None:
    parser.error(f"--against={args.against}: no model/decoding.py or "
                 "model/decoding/__init__.py there (give a checkout, its "
                 "model/decoding.py or its model/decoding/)")
  methods = [m for m in args.methods.split(",") if m]
  unknown = sorted(set(methods) - set(SEARCHES))
  if unknown or not methods:
    parser.error(f"--methods: unknown {unknown or args.methods!r}; choose "
                 f"from {', '.join(SEARCHES)}")
  if args.rounds < 1 or args.num_verses < 1 or args.batch_size < 1:
    parser.error("--rounds, --num_verses and --batch_size must be >= 1")

  notes: list[str] = []
  ids, config, params = load_test_sources(parser, args, notes)
  for note in notes:
    print(f"note: {note}")
  batches = [src for _, src in make_batches(ids[:args.num_verses],
                                            args.batch_size, config.max_len)]
  versions = {"ours": decoding, "theirs": load_decoding(other)}
  common = dict(machine(), benchmark="decode_ab", against=str(other),
                verses=min(len(ids), args.num_verses),
                batch_size=args.batch_size)
  rows = []
  for method in methods:
    result = compare(versions, config, params, batches, method, args.rounds)
    if not result["same_tokens"]:
      print(f"note: {method}: the two versions' tokens differ (the ratio "
            "compares different searches)")
    ours, theirs = result["seconds"]["ours"], result["seconds"]["theirs"]
    for r, (a, b) in enumerate(zip(ours, theirs)):
      emit(dict(common, method=method, round=r, ours_s=round(a, 3),
                theirs_s=round(b, 3), ratio=round(b / a, 3),
                same_tokens=result["same_tokens"]))
    rows.append(dict(
        method=method, ours_s=round(statistics.median(ours), 2),
        theirs_s=round(statistics.median(theirs), 2),
        ratio=round(statistics.median(b / a for a, b in zip(ours, theirs)),
                    3),
        ratios=" ".join(f"{b / a:.3f}" for a, b in zip(ours, theirs)),
        same_tokens=result["same_tokens"]))
  print()
  print(table(rows, ["method", "ours_s", "theirs_s", "ratio", "ratios",
                     "same_tokens"]))


if __name__ == "__main__":
  main()
