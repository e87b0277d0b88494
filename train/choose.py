"""Choose the params and the length penalty on validation, then score test.

    python -m train.choose --workdir=<dir> [--max_sentences=300]
        [--alphas=1.0,1.4] [--beam_size=4] [--test_split=test]
        [--output_dir=<workdir>/eval_validation]
        [--test_output_dir=<workdir>/eval_test]

Greedy BLEU on --max_sentences validation verses (evenly spaced) picks the
params: the last checkpoint, the mean of the last 3 (when there are two or
more checkpoints) or, in a run that keeps one (optimizer.ema_decay > 0), the
moving average of the params. Beam BLEU with those params then picks the
length penalty among --alphas. Ties keep the first. With --test_split the
chosen model decodes that split (all of it) with beam search. Every pass
writes the files ``train.evaluate`` writes for it, and the choice goes to
``<output_dir>/choice.json``; the last line printed is the choice as flags
of ``train.evaluate`` and ``train.translate``::

    chosen: --ema --alpha=1.4 --beam_size=4

One process does what six ``train.evaluate`` runs did (five validation
passes and the test split): the split is read once, each candidate's params
once, and every pass after the first of its search reuses the compiled
programs (params and alpha are traced arguments). Exit status 0, 2 on a
usage mistake (one line on stderr, before any model loads), 1 if an output
cannot be written.
"""

from __future__ import annotations

import functools
import json
import sys
from typing import Any, Sequence

from absl import flags
from etils import epath

from train import cli, evaluate, inference
from train.translation import DecodeOptions

# (name, flags of train.evaluate, inference.load keyword arguments)
_PARAMS = (("last", ["--average_last=1"], dict(average_last=1)),
           ("mean_last3", ["--average_last=3"], dict(average_last=3)),
           ("ema", ["--ema"], dict(ema=True)))


def best(scores: Sequence[tuple[Any, float]]):
  """The key of the highest score; ties keep the first."""
  top = max(score for _, score in scores)
  return next(key for key, score in scores if score == top)


def params_candidates(workdir) -> list[tuple[str, list[str], dict]]:
  """The params to choose among: the mean of the last 3 needs two or more
  checkpoints (it would equal the last), the moving average a run that kept
  one."""
  steps = inference.check_workdir(workdir)
  ema = inference.has_ema(inference.run_config(workdir).to_dict())
  return [c for c in _PARAMS
          if (c[0] != "mean_last3" or len(steps) > 1)
          and (c[0] != "ema" or ema)]


def run(workdir, *, split="validation", max_sentences=300,
        alphas=(1.0, 1.4), beam_size=4, batch_size=64, max_extra_len=50,
        test_split=None, output_dir=None, test_output_dir=None,
        devices=None, log=functools.partial(print, flush=True)
        ) -> dict[str, Any]:
  """Chooses on `split`, then scores `test_split` if given; the choice record.

  The record: "params" (a name of _PARAMS), "alpha", "flags" (of
  train.evaluate / train.translate), "greedy" and "beam" (name or alpha ->
  validation BLEU), and "test" (the test split's record) with test_split.
  """
  what, sources, references = evaluate.read_sources(
      workdir, split=split, max_sentences=max_sentences)
  if references is None:
    raise cli.UsageError(f"--split={split} has no references to choose by")
  if test_split:   # both splits checked before any directory is made
    test_what, test_sources, test_references = evaluate.read_sources(
        workdir, split=test_split, flag="--test_split")
  out_dir = evaluate.output_dir_of(
      workdir, output_dir or epath.Path(workdir) / "eval_validation")
  test_dir = None
  if test_split:
    test_dir = evaluate.output_dir_of(
        workdir, test_output_dir or epath.Path(workdir) / "eval_test",
        flag="--test_output_dir")
  decode = dict(max_extra_len=max_extra_len, batch_size=batch_size)
  greedy = DecodeOptions(method="greedy", **decode)
  beams = [DecodeOptions(method="beam", beam_size=beam_size, alpha=a, **decode)
           for a in alphas]   # a ValueError here comes before anything loads

  def scored(loaded, options, data, directory):
    record = evaluate.decode_and_score(loaded, *data, options, directory,
                                       devices)
    if "write_error" in record:
      raise OSError(record["write_error"])
    return record

  def one_pass(name, loaded, options):
    record = scored(loaded, options, (what, sources, references), out_dir)
    log(f"  {name}: {record['bleu_detail']}")
    return record["bleu"]

  loaded, greedy_bleu = {}, []
  for name, _, load_args in params_candidates(workdir):
    loaded[name] = inference.load(workdir, "latest", **load_args)
    tag = inference.checkpoint_tag(loaded[name].steps, loaded[name].ema)
    greedy_bleu.append(
        (name, one_pass(f"greedy {name} ({tag})", loaded[name], greedy)))
  chosen = best(greedy_bleu)
  model = loaded.pop(chosen)
  loaded.clear()   # the other candidates' params
  beam_bleu = [(o, one_pass(f"beam{beam_size} alpha {o.alpha:g}", model, o))
               for o in beams]
  beam = best(beam_bleu)
  params_flags = next(f for n, f, _ in _PARAMS if n == chosen)
  record: dict[str, Any] = {
      "workdir": str(workdir), "data": what, "params": chosen,
      "alpha": beam.alpha, "beam_size": beam_size,
      "flags": params_flags + [f"--alpha={beam.alpha:g}",
                               f"--beam_size={beam_size}"],
      "greedy": dict(greedy_bleu),
      "beam": {f"{o.alpha:g}": b for o, b in beam_bleu}}
  if test_split:
    test = scored(model, beam, (test_what, test_sources, test_references),
                  test_dir)
    record["test"] = {k: test[k] for k in
                      ("data", "steps", "ema", "bleu", "chrf", "bleu_detail",
                       "chrf_detail", "bleu_signature", "json_file",
                       "hypotheses_file") if k in test}
  path = out_dir / "choice.json"
  path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
  record["choice_file"] = str(path)
  return record


def _define_flags(fv: flags.FlagValues):
  d = dict(flag_values=fv)
  flags.DEFINE_string("workdir", None, "The training run's directory.", **d)
  flags.DEFINE_string("split", "validation", "The split to choose on.", **d)
  flags.DEFINE_integer("max_sentences", 300, "Choose on this many verses, "
                       "evenly spaced through --split (0: all).", **d)
  flags.DEFINE_list("alphas", ["1.0", "1.4"], "Length penalties to choose "
                    "among (GNMT alpha >= 0).", **d)
  flags.DEFINE_integer("beam_size", 4, "Beam width.", **d)
  flags.DEFINE_integer("batch_size", 64, "Sentences per decoding batch.", **d)
  flags.DEFINE_integer("max_extra_len", 50, "Output tokens allowed beyond the "
                       "source length.", **d)
  flags.DEFINE_string("test_split", None, "Then decode this split with the "
                      "chosen model (beam search).", **d)
  flags.DEFINE_string("output_dir", None, "Where the validation passes and "
                      "choice.json go (default <workdir>/eval_validation).",
                      **d)
  flags.DEFINE_string("test_output_dir", None, "Where the test pass goes "
                      "(default <workdir>/eval_test).", **d)
  flags.DEFINE_integer("decode_devices", 0, "Devices to spread the batches "
                       "over (see train.evaluate).", **d)


def main(argv: Sequence[str]) -> int:
  f = cli.parse_flags(_define_flags, argv, __doc__)
  devices = cli.decoding_devices(f.decode_devices)   # before Orbax starts JAX
  if not f.workdir:
    raise cli.UsageError("--workdir is required: the directory of a training "
                         "run")
  try:
    inference.check_workdir(f.workdir)
    alphas = [float(a) for a in f.alphas]
  except FileNotFoundError as e:
    raise cli.UsageError(str(e)) from None
  except ValueError:
    raise cli.UsageError(f"--alphas={','.join(f.alphas)}: use numbers >= 0, "
                         "comma-separated") from None
  if not alphas:
    raise cli.UsageError("--alphas: give at least one length penalty")
  if f.max_sentences < 0:
    raise cli.UsageError(f"--max_sentences={f.max_sentences}: use a count "
                         ">= 0 (0: all)")
  if any(a < 0 for a in alphas):
    raise cli.UsageError(f"--alphas={','.join(f.alphas)}: use numbers >= 0 "
                         "(GNMT length penalty exponents)")
  try:   # the searches' options, checked before any model loads
    DecodeOptions(method="beam", beam_size=f.beam_size, alpha=alphas[0],
                  batch_size=f.batch_size, max_extra_len=f.max_extra_len)
  except ValueError as e:
    raise cli.UsageError(str(e)) from None
  try:
    record = run(f.workdir, split=f.split, max_sentences=f.max_sentences,
                 alphas=alphas, beam_size=f.beam_size,
                 batch_size=f.batch_size, max_extra_len=f.max_extra_len,
                 test_split=f.test_split, output_dir=f.output_dir,
                 test_output_dir=f.test_output_dir, devices=devices)
  except OSError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if "test" in record:
    test = record["test"]
    print(f"test: {test['bleu_detail']}")
    print(f"  signature: {test['bleu_signature']}")
    print(f"test: {test['chrf_detail']}")
    print(f"scores: {test['json_file']}")
  print(f"choice: {record['choice_file']}")
  print(f"chosen: {' '.join(record['flags'])}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(cli.run_command(main, sys.argv))
