"""Decode a split or a file with a trained model and score it with sacreBLEU.

    python -m train.evaluate --workdir=<dir> [--split=test|validation]
        [--input=src.txt --reference=ref.txt] [--checkpoint=latest|best|<step>]
        [--average_last=N] [--ema] [--decoding=beam|greedy] [--beam_size=4]
        [--alpha=0.6]

Hypotheses are detokenised by the run's SentencePiece model and scored with
sacreBLEU on raw text: BLEU (cased, 13a tokenisation) and chrF, signatures
printed. Written to ``<output_dir>/<what>.<checkpoint>.<decoding>.{txt,json}``
(default ``<workdir>/eval``: the hypotheses, one per line in the split's
order, and the scores). ``--average_last=N`` averages the params of the last
N checkpoints up to the chosen one (the paper averages the last 5 or 20);
``--ema`` scores the moving average of the params that a run with
``optimizer.ema_decay`` > 0 keeps (file names then start ``ema_``).

Every flag, the input files (same line counts), the split and the output
directory (writable) are checked before the model loads: a mistake is one
line on stderr and exit status 2. If writing the outputs fails after
decoding, the scores are still printed (exit status 1).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
from typing import Any, Sequence

import numpy as np
from absl import flags
from etils import epath

import tokenizer as tokenizer_lib
from model import PAD_ID, TransformerConfig, decoding
from train import cli, inference
from train.datasets import parallel_text, sources as sources_lib
from train.translation import (DecodeOptions, bucket_length, decode_batch,
                               translate_texts)


# ---------------------------------------------------------------- scoring

def score(hypotheses: Sequence[str], references: Sequence[str]
          ) -> dict[str, Any]:
  """sacreBLEU corpus BLEU (cased, 13a) and chrF, with their signatures."""
  from sacrebleu.metrics import BLEU, CHRF  # pylint: disable=g-import-not-at-top
  if len(hypotheses) != len(references):
    raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} "
                     "references: the files must have one line per sentence")
  bleu, chrf = BLEU(), CHRF()
  bleu_score = bleu.corpus_score(list(hypotheses), [list(references)])
  chrf_score = chrf.corpus_score(list(hypotheses), [list(references)])
  return {"bleu": bleu_score.score, "chrf": chrf_score.score,
          "bleu_signature": str(bleu.get_signature()),
          "chrf_signature": str(chrf.get_signature()),
          "bleu_detail": str(bleu_score), "chrf_detail": str(chrf_score),
          "num_sentences": len(hypotheses)}


def validation_bleu(model_config: TransformerConfig, params, batches,
                    references: Sequence[str], tok: tokenizer_lib.Tokenizer,
                    options: DecodeOptions) -> dict[str, float]:
  """{"bleu", "chrf"} of decoding eval batches, for the trainer.

  batches: eval batches of the input pipeline (``src`` int32 [rows, max_len],
  ``row_mask``, ``index`` into ``references``), decoded with ``options``.
  Multi-host: the trainer passes every host the same rows (all of them), so
  all hosts run the same search.
  """
  hypotheses, chosen = [], []
  for batch in batches:
    real = np.asarray(batch["row_mask"]) > 0
    if not real.any():
      continue
    src = np.asarray(batch["src"])
    longest = int((src != PAD_ID).sum(axis=1).max())
    src = src[:, :min(bucket_length(longest), src.shape[1])]
    tokens = decode_batch(model_config, params, src, options, 0)
    ids = decoding.strip_special(tokens)
    for row in np.flatnonzero(real):
      hypotheses.append(ids[row])
      chosen.append(references[int(batch["index"][row])])
  if not hypotheses:
    return {}
  scores = score(tok.decode_batch(hypotheses), chosen)
  return {"bleu": scores["bleu"], "chrf": scores["chrf"]}


# ---------------------------------------------------------------- the command

def _define_flags(fv: flags.FlagValues):
  cli.define_model_flags(fv)
  cli.define_decode_flags(fv, methods=("beam", "greedy"))
  d = dict(flag_values=fv)
  flags.DEFINE_string("split", "test", "Split of the run's dataset to decode "
                      "(ignored with --input). Select models on validation.",
                      **d)
  flags.DEFINE_string("input", None, "A file of source sentences, one a line.",
                      **d)
  flags.DEFINE_string("reference", None, "Reference translations of --input, "
                      "one a line (same line count).", **d)
  flags.DEFINE_string("output_dir", None, "Where to write hypotheses and "
                      "scores (default <workdir>/eval).", **d)
  flags.DEFINE_integer("max_sentences", 0, "Score only this many sentences, "
                       "evenly spaced through the split or file (0: all): "
                       "cheap model choices on validation.", **d)


def _read_input(input_file, reference_file):
  """(sources, references or None), line counts checked; UsageError."""
  try:
    sources = parallel_text.read_lines(input_file)
    references = (parallel_text.read_lines(reference_file)
                  if reference_file else None)
  except parallel_text.ParallelTextError as e:
    raise cli.UsageError(str(e)) from None
  if references is not None and len(references) != len(sources):
    raise cli.UsageError(
        f"--input={input_file} has {len(sources)} lines but --reference="
        f"{reference_file} has {len(references)}: they must be line-aligned")
  return sources, references


def _read_split(workdir, split: str, flag: str = "--split"):
  """(sources, references) of a split of the run's dataset; UsageError."""
  data_config = inference.run_config(workdir).data
  try:
    source = sources_lib.get_source(data_config, split)
    pairs = source.get_many(range(len(source)))
  except Exception as e:  # pylint: disable=broad-except
    # tfds and the parallel-text reader raise several types for a bad split.
    first = (str(e).strip() or repr(e)).splitlines()[0][:200]
    raise cli.UsageError(
        f"{flag}={split}: not a split of the run's dataset "
        f"{data_config.name!r} ({first}); use validation or test") from None
  return [p["src"] for p in pairs], [p["tgt"] for p in pairs]


def _writable_dir(path: epath.Path, flag: str = "--output_dir"
                  ) -> epath.Path:
  """Creates path if needed and checks a file can be written in it."""
  try:
    path.mkdir(parents=True, exist_ok=True)
    if "://" not in os.fspath(path):
      with tempfile.NamedTemporaryFile(dir=os.fspath(path)):
        pass
  except OSError as e:
    raise cli.UsageError(
        f"{flag}={path}: not writable ({e.strerror or e}); pass a "
        f"writable {flag}") from None
  return path


def evenly_spaced(n: int, k: int) -> list[int]:
  """k indices spread evenly over range(n) (all of them if k <= 0 or k >= n)."""
  if k <= 0 or k >= n:
    return list(range(n))
  return [int(i * n / k) for i in range(k)]


def read_sources(workdir, *, split="test", input_file=None,
                 reference_file=None, max_sentences=0, flag="--split"
                 ) -> tuple[str, list[str], list[str] | None]:
  """(what, sources, references or None) of a split or a file (UsageError).

  what names the data in output file names: the split or the file's name,
  with ``.<k>of<n>`` when max_sentences keeps k evenly spaced of n. flag:
  the option that named the split, for the error message.
  """
  if input_file:
    sources, references = _read_input(input_file, reference_file)
    what = epath.Path(input_file).name
  else:
    sources, references = _read_split(workdir, split, flag)
    what = split
  if 0 < max_sentences < len(sources):
    what = f"{what}.{max_sentences}of{len(sources)}"
    keep = evenly_spaced(len(sources), max_sentences)
    sources = [sources[i] for i in keep]
    references = None if references is None else [references[i] for i in keep]
  return what, sources, references


def output_dir_of(workdir, output_dir=None, flag="--output_dir"
                  ) -> epath.Path:
  """--output_dir (default <workdir>/eval), created and checked writable."""
  return _writable_dir(epath.Path(output_dir or epath.Path(workdir) / "eval"),
                       flag)


def decode_and_score(loaded: inference.LoadedModel, what: str,
                     sources: Sequence[str], references: Sequence[str] | None,
                     options: DecodeOptions, out_dir: epath.Path,
                     devices=None) -> dict[str, Any]:
  """Decodes sources with a loaded model, scores them, writes both.

  Writes ``<out_dir>/<what>.<checkpoint tag>.<decoding tag>.{txt,json}``;
  an OSError writing them leaves the scores in the record under
  "write_error".
  """
  max_src_tokens = loaded.experiment_config.get("data", {}).get("max_len")
  hypotheses, _, _ = translate_texts(loaded.model_config, loaded.params,
                                     loaded.tokenizer, sources, options,
                                     max_src_tokens=max_src_tokens,
                                     devices=devices)
  tag = inference.checkpoint_tag(loaded.steps, loaded.ema)
  stem = f"{what}.{tag}.{options.tag()}"
  record: dict[str, Any] = {
      "workdir": loaded.workdir, "data": what, "steps": loaded.steps,
      "ema": loaded.ema,
      "decoding": dataclasses.asdict(options),
      "num_sentences": len(hypotheses)}
  if references is not None:
    record.update(score(hypotheses, references))
  try:
    hyp_path = out_dir / f"{stem}.txt"
    hyp_path.write_text("".join(h + "\n" for h in hypotheses),
                        encoding="utf-8")
    record["hypotheses_file"] = str(hyp_path)
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    record["json_file"] = str(json_path)
  except OSError as e:
    record["write_error"] = f"cannot write to {out_dir}: {e}"
  return record


def run(workdir, *, split="test", input_file=None, reference_file=None,
        checkpoint="latest", average_last=0, ema=False,
        options=DecodeOptions(),
        output_dir=None, max_sentences=0, devices=None) -> dict[str, Any]:
  """Decodes and scores; returns (and writes) the result record.

  devices: where the batches are decoded (``translation.decode_ids``).

  Inputs, the split and the output directory are checked first
  (cli.UsageError); an OSError writing the outputs leaves the scores in the
  record under "write_error".
  """
  what, sources, references = read_sources(
      workdir, split=split, input_file=input_file,
      reference_file=reference_file, max_sentences=max_sentences)
  out_dir = output_dir_of(workdir, output_dir)
  loaded = inference.load(workdir, checkpoint, average_last, ema)
  return decode_and_score(loaded, what, sources, references, options, out_dir,
                          devices)


def main(argv: Sequence[str]) -> int:
  f = cli.parse_flags(_define_flags, argv, __doc__)
  # First: reading the run's config through Orbax starts JAX's backend.
  devices = cli.decoding_devices(f.decode_devices)
  workdir, checkpoint, average_last, ema = cli.model_choice(f)
  options = cli.decode_options(f)
  if f.reference and not f.input:
    raise cli.UsageError("--reference needs --input (the source file it "
                         "translates)")
  if f.max_sentences < 0:
    raise cli.UsageError(f"--max_sentences={f.max_sentences}: use a count "
                         ">= 0 (0: all)")
  record = run(workdir, split=f.split, input_file=f.input,
               reference_file=f.reference, checkpoint=checkpoint,
               average_last=average_last, ema=ema, options=options,
               output_dir=f.output_dir, max_sentences=f.max_sentences,
               devices=devices)
  if "hypotheses_file" in record:
    print(f"hypotheses: {record['hypotheses_file']}")
  if "bleu" in record:
    print(record["bleu_detail"])
    print(f"  signature: {record['bleu_signature']}")
    print(record["chrf_detail"])
    print(f"  signature: {record['chrf_signature']}")
  if "write_error" in record:
    print(f"error: {record['write_error']}", file=sys.stderr)
    return 1
  print(f"scores: {record['json_file']}")
  return 0


if __name__ == "__main__":
  sys.exit(cli.run_command(main, sys.argv))
