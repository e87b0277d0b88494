"""Decode a split or a file with a trained model and score it with sacreBLEU.

    python -m train.evaluate --workdir=<dir> [--split=test|validation]
        [--input=src.txt --reference=ref.txt] [--checkpoint=latest|best|<step>]
        [--average_last=N] [--decoding=beam|greedy] [--beam_size=4] [--alpha=0.6]

Hypotheses are detokenised by the run's SentencePiece model and scored with
sacreBLEU on raw text: BLEU (cased, 13a tokenisation) and chrF, signatures
printed. Written to ``<workdir>/eval/<what>.<checkpoint>.<decoding>.{txt,json}``
(the hypotheses, one per line in the split's order, and the scores).
``--average_last=N`` averages the params of the last N checkpoints up to the
chosen one (the paper averages the last 5 or 20).

Library functions (also used by train.translate and the trainer):
  DecodeOptions                     how to decode (method, beam, alpha, ...)
  make_batches(sources, batch_size, max_len)  length-bucketed batches
  decode_batch(model_config, params, src, options, batch_index) -> tokens
  decode_ids(model_config, params, sources, options) -> list[list[int]]
  encode_sources(tok, texts, max_src_tokens, on_truncate) -> (kept, ids)
  translate_texts(model_config, params, tok, texts, options)
                                    -> (translations, source ids, output ids)
  score(hypotheses, references) -> dict   (bleu, chrf and their signatures)
  validation_bleu(model_config, params, batches, eval_data, tokenizer, config)
  load_params(workdir, checkpoint, average_last) -> LoadedModel
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np
from absl import flags, logging
from etils import epath

import tokenizer as tokenizer_lib
from model import EOS_ID, PAD_ID, TransformerConfig, decoding
from train import checkpointing
from train.datasets import parallel_text

# Source lengths are padded up to one of these, so a whole split compiles the
# decoder a handful of times only (one compilation per bucket).
LENGTH_BUCKETS = (16, 32, 64, 128, 256)
METHODS = ("beam", "greedy", "sample")


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
  """How to decode. The defaults are the paper's (beam 4, alpha 0.6, +50)."""

  method: str = "beam"          # beam | greedy | sample
  beam_size: int = 4
  alpha: float = 0.6
  max_extra_len: int = 50       # output tokens allowed beyond the source's
  temperature: float = 1.0      # sampling knobs (method="sample")
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  batch_size: int = 64          # sentences per decoding batch

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"decoding method {self.method!r} is not one of "
                       f"{METHODS}")
    if self.batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

  def tag(self) -> str:
    """A short name for file names: beam4_a0.6, greedy, sample_t1.0_k0_p0.9."""
    if self.method == "beam":
      return f"beam{self.beam_size}_a{self.alpha:g}"
    if self.method == "greedy":
      return "greedy"
    return (f"sample_t{self.temperature:g}_k{self.top_k}_p{self.top_p:g}"
            f"_s{self.seed}")


def bucket_length(length: int) -> int:
  """The padded source length used for a batch whose longest row is `length`."""
  for bucket in LENGTH_BUCKETS:
    if length <= bucket:
      return bucket
  return int(math.ceil(length / 128) * 128)


def decode_batch(model_config, params, src: np.ndarray, options: DecodeOptions,
                  batch_index: int):
  """src int32 [rows, length] -> tokens int32 [rows, out_len]."""
  if options.method == "beam":
    return decoding.beam_search(
        model_config, params, src, beam_size=options.beam_size,
        alpha=options.alpha, max_extra_len=options.max_extra_len).sequences[:, 0]
  if options.method == "greedy":
    return decoding.greedy_search(model_config, params, src,
                                  max_extra_len=options.max_extra_len)
  rng = jax.random.fold_in(jax.random.key(options.seed), batch_index)
  return decoding.sample(model_config, params, src, rng,
                         temperature=options.temperature, top_k=options.top_k,
                         top_p=options.top_p,
                         max_extra_len=options.max_extra_len)


def make_batches(sources: Sequence[np.ndarray], batch_size: int,
                 max_len: int) -> list[tuple[list[int], np.ndarray]]:
  """Length-bucketed batches: [(indices into sources, src int32 [rows, len])].

  Sources are sorted by length (longest first) and cut into batches of
  ``batch_size`` rows, each padded to a length bucket, so similar lengths
  share a batch and few shapes get compiled. Every batch has the same number
  of rows (a short last batch gets empty sentences), so one compilation per
  bucket. Every source must fit: ``len <= max_len``.
  """
  order = sorted(range(len(sources)), key=lambda i: -len(sources[i]))
  # A power of two >= 4 (few distinct shapes), at most batch_size.
  rows = min(batch_size, max(4, 1 << max(0, len(sources) - 1).bit_length()))
  batches = []
  for start in range(0, len(order), rows):
    chunk = order[start:start + rows]
    longest = max(len(sources[i]) for i in chunk)
    if longest > max_len:
      raise ValueError(f"a source of {longest} tokens exceeds the model's "
                       f"max_len={max_len}; truncate it first")
    src = np.full((rows, min(bucket_length(longest), max_len)), PAD_ID,
                  np.int32)
    src[len(chunk):, 0] = EOS_ID  # padding rows: an empty sentence
    for row, i in enumerate(chunk):
      src[row, :len(sources[i])] = sources[i]
    batches.append((chunk, src))
  return batches


def decode_ids(model_config: TransformerConfig, params,
               sources: Sequence[np.ndarray], options: DecodeOptions
               ) -> list[list[int]]:
  """Token ids of each source (ending with eos) -> output ids (no eos), in order.

  Decodes in length-bucketed batches (``make_batches``). Every source must
  fit the model (``len <= model_config.max_len``): truncate beforehand.
  """
  outputs: list[list[int]] = [[] for _ in sources]
  batches = make_batches(sources, options.batch_size, model_config.max_len)
  for batch_index, (chunk, src) in enumerate(batches):
    tokens = decode_batch(model_config, params, src, options, batch_index)
    for i, ids in zip(chunk, decoding.strip_special(tokens)):
      outputs[i] = ids
  return outputs


def truncate(ids: np.ndarray, max_tokens: int) -> np.ndarray:
  """Keeps the first max_tokens - 1 tokens and the final eos."""
  if len(ids) <= max_tokens:
    return ids
  return np.concatenate([ids[:max_tokens - 1], [EOS_ID]]).astype(np.int32)


def encode_sources(tok: tokenizer_lib.Tokenizer, texts: Sequence[str],
                   max_src_tokens: int,
                   on_truncate: Callable[[int, int], None] | None = None
                   ) -> tuple[list[int], list[np.ndarray]]:
  """(indices of the non-empty texts, their token ids with eos).

  Ids longer than max_src_tokens are truncated (eos kept); on_truncate(index,
  num_tokens) is told of each.
  """
  keep = [i for i, text in enumerate(texts) if text.strip()]
  ids = []
  for i, x in zip(keep, tok.encode_batch([texts[i] for i in keep])):
    if len(x) > max_src_tokens:
      if on_truncate is not None:
        on_truncate(i, len(x))
      x = truncate(x, max_src_tokens)
    ids.append(x)
  return keep, ids


def translate_texts(model_config: TransformerConfig, params,
                    tok: tokenizer_lib.Tokenizer, texts: Sequence[str],
                    options: DecodeOptions, max_src_tokens: int | None = None,
                    on_truncate: Callable[[int, int], None] | None = None
                    ) -> tuple[list[str], list[np.ndarray], list[list[int]]]:
  """Sentences -> (translations, source ids, output ids).

  translations: one per text, same order; an empty text gives "". The id
  lists hold the non-empty texts only (see ``encode_sources``; output ids
  without eos). Sources longer than max_src_tokens (default and cap: the
  model's max_len) are truncated.
  """
  max_src_tokens = min(max_src_tokens or model_config.max_len,
                       model_config.max_len)
  keep, ids = encode_sources(tok, texts, max_src_tokens, on_truncate)
  outputs = decode_ids(model_config, params, ids, options)
  out = [""] * len(texts)
  for i, hypothesis in zip(keep, tok.decode_batch(outputs)):
    out[i] = hypothesis
  return out, ids, outputs


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
                    eval_data, tokenizer, config) -> dict[str, float]:
  """Periodic validation BLEU for the trainer (train/trainer.py's hook).

  batches: eval batches of the input pipeline (``src`` int32 [rows, max_len],
  ``row_mask``, ``index`` into eval_data.references). Decodes this process's
  rows with ``config.eval_bleu_beam_size`` (default 4; 1 = greedy) and
  ``config.eval_bleu_alpha`` (default 0.6), outputs of at most source +
  ``config.eval_bleu_max_extra_len`` (default 50) tokens, and returns
  {"bleu", "chrf"}
  against the matching references. Multi-host: the trainer passes every
  host the same rows (all of them), so all hosts run the same search.
  """
  beam_size = int(config.get("eval_bleu_beam_size", 4))
  options = DecodeOptions(
      method="beam" if beam_size > 1 else "greedy", beam_size=beam_size,
      alpha=float(config.get("eval_bleu_alpha", 0.6)),
      max_extra_len=int(config.get("eval_bleu_max_extra_len", 50)))
  hypotheses, references = [], []
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
      references.append(eval_data.references[int(batch["index"][row])])
  if not hypotheses:
    return {}
  scores = score(tokenizer.decode_batch(hypotheses), references)
  return {"bleu": scores["bleu"], "chrf": scores["chrf"]}


# ---------------------------------------------------------------- loading

class LoadedModel(NamedTuple):
  model_config: TransformerConfig
  params: Any
  experiment_config: Any   # ml_collections.ConfigDict of the run
  steps: list[int]         # the checkpoint step(s) whose params these are
  tokenizer: tokenizer_lib.Tokenizer


def average_checkpoints(workdir, steps: Sequence[int]):
  """Element-wise mean of the params of several steps.

  Accumulated one checkpoint at a time in float64 (memory: two copies of the
  params), so averaging N copies of one checkpoint returns it exactly.
  """
  total = None
  for step in steps:
    params = checkpointing.restore_params(workdir, [step])[0]
    params = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    total = params if total is None else jax.tree.map(np.add, total, params)
  return jax.tree.map(lambda x: (x / len(steps)).astype(np.float32), total)


def load_params(workdir, checkpoint: str | int = "latest",
                average_last: int = 0) -> LoadedModel:
  """Model config, params (of one step, or averaged) and tokenizer of a run.

  average_last=N > 1: the mean of the last N checkpoints up to and including
  the chosen one (fewer if fewer exist, with a warning).
  """
  step = checkpointing.resolve_step(workdir, checkpoint)
  model_config, params, experiment = checkpointing.load_for_inference(
      workdir, step)
  steps = [step]
  if average_last > 1:
    steps = [s for s in checkpointing.list_steps(workdir) if s <= step]
    steps = steps[-average_last:]
    if len(steps) < average_last:
      logging.warning("--average_last=%d but only %d checkpoints up to step "
                      "%d exist (%s): averaging those.", average_last,
                      len(steps), step, steps)
    if len(steps) > 1:
      params = average_checkpoints(workdir, steps)
  tok = tokenizer_lib.load(tokenizer_lib.model_path(workdir))
  if tok.vocab_size > model_config.vocab_size:
    raise ValueError(f"the tokenizer in {workdir} has {tok.vocab_size} ids but "
                     f"the model only {model_config.vocab_size}: they are not "
                     "from the same run")
  return LoadedModel(model_config, params, experiment, steps, tok)


def checkpoint_tag(steps: Sequence[int]) -> str:
  if len(steps) == 1:
    return f"step{steps[0]}"
  return f"avg{len(steps)}_step{steps[0]}-{steps[-1]}"


# ---------------------------------------------------------------- the CLI

def parse_flags(define, argv: Sequence[str], usage: str) -> flags.FlagValues:
  """Parses argv with a private FlagValues (no clash with other modules' flags).

  define(fv) defines the flags on fv. Prints help and exits on --help; raises
  SystemExit(2) with the message on a bad flag.
  """
  fv = flags.FlagValues()
  define(fv)
  if any(a in ("--help", "-h", "--helpfull") for a in argv[1:]):
    print(usage.strip() + "\n\n" + fv.get_help())
    raise SystemExit(0)
  try:
    rest = fv(list(argv))
  except flags.Error as e:
    print(f"error: {e}\n(see --help)", file=sys.stderr)
    raise SystemExit(2) from e
  if len(rest) > 1:
    print(f"error: unexpected arguments {rest[1:]}", file=sys.stderr)
    raise SystemExit(2)
  return fv


def _define_flags(fv: flags.FlagValues):
  flags.DEFINE_string("workdir", None, "The training run's directory.",
                      flag_values=fv)
  flags.DEFINE_string("split", "test", "Split of the run's dataset to decode "
                      "(ignored with --input). Select models on validation.",
                      flag_values=fv)
  flags.DEFINE_string("input", None, "A file of source sentences, one a line.",
                      flag_values=fv)
  flags.DEFINE_string("reference", None, "Reference translations of --input.",
                      flag_values=fv)
  flags.DEFINE_string("checkpoint", "latest", "latest, best or a step number.",
                      flag_values=fv)
  flags.DEFINE_integer("average_last", 0, "Average the params of the last N "
                       "checkpoints (up to --checkpoint); 0 or 1: no averaging.",
                       flag_values=fv)
  flags.DEFINE_enum("decoding", "beam", ["beam", "greedy"], "Search.",
                    flag_values=fv)
  flags.DEFINE_integer("beam_size", 4, "Beam width.", flag_values=fv)
  flags.DEFINE_float("alpha", 0.6, "GNMT length penalty exponent.",
                     flag_values=fv)
  flags.DEFINE_integer("max_extra_len", 50, "Output tokens allowed beyond the "
                       "source length.", flag_values=fv)
  flags.DEFINE_integer("batch_size", 64, "Sentences per decoding batch.",
                       flag_values=fv)
  flags.DEFINE_string("output_dir", None, "Where to write hypotheses and "
                      "scores (default <workdir>/eval).", flag_values=fv)


def parse_checkpoint(value: str) -> str | int:
  if value in ("latest", "best"):
    return value
  try:
    return int(value)
  except ValueError:
    raise SystemExit(f"error: --checkpoint={value!r}: use latest, best or a "
                     "step number") from None


def run(workdir, *, split="test", input_file=None, reference_file=None,
        checkpoint="latest", average_last=0, options=DecodeOptions(),
        output_dir=None) -> dict[str, Any]:
  """Decodes and scores; returns (and writes) the result record."""
  loaded = load_params(workdir, checkpoint, average_last)
  if input_file:
    sources = parallel_text.read_lines(input_file)
    references = (parallel_text.read_lines(reference_file)
                  if reference_file else None)
    what = epath.Path(input_file).name
  else:
    from train import input_pipeline  # pylint: disable=g-import-not-at-top
    data_config = loaded.experiment_config.data
    eval_data = input_pipeline.make_eval_data(data_config, loaded.tokenizer,
                                              batch_size=1, split=split,
                                              process_index=0, process_count=1)
    sources, references = eval_data.sources, eval_data.references
    what = split
  max_src_tokens = loaded.experiment_config.get("data", {}).get("max_len")
  hypotheses, _, _ = translate_texts(loaded.model_config, loaded.params,
                                     loaded.tokenizer, sources, options,
                                     max_src_tokens=max_src_tokens)
  out_dir = epath.Path(output_dir or epath.Path(workdir) / "eval")
  out_dir.mkdir(parents=True, exist_ok=True)
  stem = f"{what}.{checkpoint_tag(loaded.steps)}.{options.tag()}"
  hyp_path = out_dir / f"{stem}.txt"
  hyp_path.write_text("".join(h + "\n" for h in hypotheses), encoding="utf-8")
  record: dict[str, Any] = {
      "workdir": str(workdir), "data": what, "steps": loaded.steps,
      "decoding": dataclasses.asdict(options),
      "hypotheses_file": str(hyp_path), "num_sentences": len(hypotheses)}
  if references is not None:
    record.update(score(hypotheses, references))
  json_path = out_dir / f"{stem}.json"
  json_path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
  record["json_file"] = str(json_path)
  return record


def main(argv: Sequence[str]) -> int:
  f = parse_flags(_define_flags, argv, __doc__)
  if not f.workdir:
    print("error: --workdir is required", file=sys.stderr)
    return 2
  if f.reference and not f.input:
    print("error: --reference needs --input", file=sys.stderr)
    return 2
  options = DecodeOptions(method=f.decoding, beam_size=f.beam_size,
                          alpha=f.alpha, max_extra_len=f.max_extra_len,
                          batch_size=f.batch_size)
  record = run(f.workdir, split=f.split, input_file=f.input,
               reference_file=f.reference,
               checkpoint=parse_checkpoint(f.checkpoint),
               average_last=f.average_last, options=options,
               output_dir=f.output_dir)
  print(f"hypotheses: {record['hypotheses_file']}")
  if "bleu" in record:
    print(record["bleu_detail"])
    print(f"  signature: {record['bleu_signature']}")
    print(record["chrf_detail"])
    print(f"  signature: {record['chrf_signature']}")
  print(f"scores: {record['json_file']}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
