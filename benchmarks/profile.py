"""Where the time goes: a jax.profiler trace of a training step and a decoding
batch, summed by HLO op and by part of the model.

    python -m benchmarks.profile [--preset small] [--max_len 128]
        [--steps 5] [--workdir runs/bible_es_en] [--decode_rows 64]
        [--trace_dir /tmp/profile]

Traces ``--steps`` training steps of ``benchmarks.training.build`` (synthetic
packed batches, 2048 positions a step) and, with ``--workdir``, greedy and
beam-4 decoding of the ``--decode_rows`` longest test verses with the trained
params (without it: random `small` params and synthetic sources, as
``benchmarks.decode`` does). The XLA CPU runtime
records one trace event per executed HLO op (thunk); each event's op is looked
up in the compiled HLO, whose metadata names the JAX operation and the Flax
module path it came from (``decoder/layers_0/ffn/wi/dot_general``). Time is
summed per op and per part (attention projections, attention scores and
softmax, feed-forward, output layer and embedding, layer norm, dropout and
random bits, loss, optimiser, ...). The raw trace stays in --trace_dir for
TensorBoard or Perfetto.

Prints JSON lines (one per part and per top op) and tables.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import pathlib
import re
import tempfile
import time


import jax

from benchmarks.common import emit, table

# (part, pattern on the op's metadata "op_name" path and opcode), first match.
PARTS = (
    ("optimiser (Adam, schedule, clipping)", r"optax|adam|scale_by|apply_updates|global_norm|clip_by"),
    ("dropout and random bits", r"[Dd]ropout|random_bits|threefry|bernoulli"),
    ("layer norm", r"_norm/|final_norm|LayerNorm|layer_norm"),
    ("KV cache write", r"attention/dynamic_update_slice"),
    ("output layer / embedding", r"attend|_embedding|output_projection|Embed"),
    ("search (top-k, gather, beam history copies)", r"top_k|sort|_gather_beams|copy_histories|argmax|_beam_segment\)?/while/body/gather"),
    ("loss (log-softmax, smoothing)", r"logsumexp|loss|label_smooth|log_softmax|cross_entropy"),
    ("attention projections (q, k, v, out)", r"attention/(query|key|value|out)/"),
    ("attention scores, softmax, mask", r"attention/|dot_product|softmax"),
    ("feed-forward (wi, wo, relu)", r"ffn/"),
)
OTHER = "other (copies, reshapes, loops)"


def hlo_op_index(hlo_text: str) -> dict[str, tuple[str, str]]:
  """HLO instruction name -> (opcode, metadata op_name) of a compiled module."""
  index = {}
  # "%name = <shape, possibly a tuple with spaces> opcode(operands), ...":
  # the opcode is the first word after the '=' that an '(' follows.
  pattern = re.compile(
      r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s.*?\s([a-z][\w\-]*)\(")
  for line in hlo_text.splitlines():
    m = pattern.match(line)
    if not m:
      continue
    op_name = re.search(r'op_name="([^"]*)"', line)
    index[m.group(1)] = (m.group(2), op_name.group(1) if op_name else "")
  return index


def part_of(opcode: str, op_name: str) -> str:
  text = f"{op_name} {opcode}"
  for part, pattern in PARTS:
    if re.search(pattern, text):
      return part
  return OTHER


def trace_events(trace_dir: str) -> list[dict]:
  """Complete ('X') events of the newest trace under trace_dir."""
  files = sorted(pathlib.Path(trace_dir).rglob("*.trace.json.gz"),
                 key=lambda p: p.stat().st_mtime)
  if not files:
    raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}")
  with gzip.open(files[-1]) as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  return [e for e in events if e.get("ph") == "X"]


def profile(name: str, fn, args, trace_dir: str, repeats: int) -> dict:
  """Runs fn(*args) `repeats` times under the profiler; time per part and op."""
  compiled = fn.lower(*args).compile()
  index = hlo_op_index(compiled.as_text())
  out = compiled(*args)  # warm
  jax.block_until_ready(out)
  out_dir = tempfile.mkdtemp(dir=trace_dir, prefix=f"{name}_")
  with jax.profiler.trace(out_dir):
    start = time.perf_counter()
    for _ in range(repeats):
      jax.block_until_ready(compiled(*args))
    total_wall = (time.perf_counter() - start) * 1e6
  by_op, by_part = collections.Counter(), collections.Counter()
  for e in trace_events(out_dir):
    op = e.get("args", {}).get("hlo_op")
    if not op or op not in index or e["name"].startswith("end:"):
      continue
    opcode, op_name = index[op]
    if opcode in ("while", "conditional", "call"):
      continue  # containers: their bodies' ops are events of their own
    by_op[(op, opcode, op_name)] += e["dur"]
    by_part[part_of(opcode, op_name)] += e["dur"]
  busy = sum(by_part.values())
  return {"name": name, "repeats": repeats, "trace_dir": out_dir,
          "wall_ms": total_wall / 1e3 / repeats, "ops_ms": busy / 1e3 / repeats,
          "by_part": by_part, "by_op": by_op}


def report(result: dict, top: int) -> None:
  if not result["by_part"]:
    print(f"\n{result['name']}: the trace holds no per-op events of this "
          f"program (trace: {result['trace_dir']})")
    return
  busy = sum(result["by_part"].values()) or 1.0
  rows = []
  for part, us in result["by_part"].most_common():
    rows.append(emit({"benchmark": "profile", "workload": result["name"],
                      "part": part, "ms": round(us / 1e3 / result["repeats"], 2),
                      "share": round(us / busy, 3)}))
  print(f"\n{result['name']}: {result['wall_ms']:.1f} ms wall per call, "
        f"{result['ops_ms']:.1f} ms in traced ops (trace: {result['trace_dir']})")
  print(table(rows, ["part", "ms", "share"]))
  op_rows = []
  for (op, opcode, op_name), us in result["by_op"].most_common(top):
    op_rows.append(emit({
        "benchmark": "profile", "workload": result["name"], "op": op,
        "opcode": opcode, "source": op_name[-70:],
        "ms": round(us / 1e3 / result["repeats"], 2),
        "share": round(us / busy, 3)}))
  print(table(op_rows, ["op", "opcode", "ms", "share", "source"]))


def decode_inputs(args):
  """(model_config, params, src int32 [rows, len]): the longest bucket of the
  test verses, as ``benchmarks.decode`` loads them (random `small` params and
  synthetic sources without --workdir)."""
  from benchmarks import decode  # pylint: disable=import-outside-toplevel
  from train.translation import make_batches  # pylint: disable=import-outside-toplevel
  notes = []
  ids, config, params = decode.test_sources(
      argparse.Namespace(workdir=args.workdir, checkpoint="latest",
                         tokenizer="", data_dir=""), notes)
  for note in notes:
    print(f"note: {note}")
  [(_, src)] = make_batches(ids, args.decode_rows, config.max_len)[:1]
  return config, params, src


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--preset", default="small")
  parser.add_argument("--max_len", type=int, default=128)
  parser.add_argument("--tokens_per_step", type=int, default=2048)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--workdir", default="")
  parser.add_argument("--decode_rows", type=int, default=64)
  parser.add_argument("--top", type=int, default=12)
  parser.add_argument("--trace_dir", default="")
  parser.add_argument("--skip", default="", help="train,greedy,beam")
  args = parser.parse_args()
  skip = set(filter(None, args.skip.split(",")))
  trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="profile_")
  os.makedirs(trace_dir, exist_ok=True)

  if "train" not in skip:
    from benchmarks import training  # pylint: disable=import-outside-toplevel
    _, _, parts, state, batch, rng = training.build(
        args.preset, args.max_len, args.tokens_per_step, "float32")
    # Not donated here: the same state is fed again at every repeat.
    step = jax.jit(parts["train_step"])
    report(profile(f"train_step_{args.preset}_{args.max_len}", step,
                   (state, batch, rng), trace_dir, args.steps), args.top)

  if not {"greedy", "beam"} <= skip:
    from model import decoding  # pylint: disable=import-outside-toplevel
    config, params, src = decode_inputs(args)
    if "greedy" not in skip:
      # One loop over the whole limit (grow_cache=False): a single compiled
      # program whose HLO names every op; the default grows the cache over
      # several such programs, each a shorter copy of this loop.
      greedy = jax.jit(lambda p, s: decoding.greedy_search(config, p, s,
                                                           grow_cache=False))
      report(profile(f"greedy_{src.shape[0]}x{src.shape[1]}", greedy,
                     (params, src), trace_dir, 2), args.top)
    if "beam" not in skip:
      beam = jax.jit(lambda p, s: decoding.beam_search(
          config, p, s, beam_size=4, alpha=0.6, grow_cache=False).sequences)
      report(profile(f"beam4_{src.shape[0]}x{src.shape[1]}", beam,
                     (params, src), trace_dir, 1), args.top)


if __name__ == "__main__":
  main()
