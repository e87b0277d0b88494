"""Translate sentences with a trained model: stdin (or --input) to stdout.

    python -m train.translate --workdir=<dir> [--input=file]
        [--decoding=beam|greedy|sample] [--beam_size=4] [--alpha=0.6]
        [--temperature=1 --top_k=0 --top_p=1 --seed=0]
        [--checkpoint=latest|best|<step>] [--average_last=N]
        [--attention_png=attn.png [--attention_layer=-1]]

One sentence a line in, one translation a line out, same order (decoded in
length-bucketed batches). An empty line gives an empty line. A line longer
than --max_input_tokens (default: the run's data.max_len) is truncated, with a
warning on stderr naming its line number. Input that is not UTF-8 stops the
program before anything is translated, naming the line; exit status 1.
Exit status 0 on success, 2 on a usage error.

--attention_png (one sentence): heat maps of the encoder-decoder and encoder
self-attention of --attention_layer, one panel per head plus their mean,
labelled with the source and output tokens.
"""

from __future__ import annotations

import sys
from typing import BinaryIO, Sequence, TextIO

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from model import EOS_ID, attention_weights, decoding
from train import attention_plot, evaluate


class InputError(ValueError):
  """The input is unusable (not UTF-8); the message names the line."""


def read_lines(stream: BinaryIO) -> list[str]:
  """Lines of a byte stream, decoded as UTF-8, without their line ends."""
  lines = []
  for number, raw in enumerate(stream, start=1):
    raw = raw.rstrip(b"\n").rstrip(b"\r")
    try:
      lines.append(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
      raise InputError(
          f"line {number}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at "
          f"byte offset {e.start}); convert the input to UTF-8, e.g. "
          "`iconv -f latin1 -t utf-8`") from None
  return lines


def _define_flags(fv: flags.FlagValues):
  d = dict(flag_values=fv)
  flags.DEFINE_string("workdir", None, "The training run's directory.", **d)
  flags.DEFINE_string("input", None, "Source file (default: stdin).", **d)
  flags.DEFINE_string("checkpoint", "latest", "latest, best or a step.", **d)
  flags.DEFINE_integer("average_last", 0, "Average the last N checkpoints.",
                       **d)
  flags.DEFINE_enum("decoding", "beam", list(evaluate.METHODS), "Search.", **d)
  flags.DEFINE_integer("beam_size", 4, "Beam width.", **d)
  flags.DEFINE_float("alpha", 0.6, "GNMT length penalty exponent.", **d)
  flags.DEFINE_integer("max_extra_len", 50, "Output tokens allowed beyond "
                       "the source length.", **d)
  flags.DEFINE_float("temperature", 1.0, "Sampling temperature (> 0).", **d)
  flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens "
                       "(0: all).", **d)
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1: all).", **d)
  flags.DEFINE_integer("seed", 0, "Sampling seed.", **d)
  flags.DEFINE_integer("batch_size", 64, "Sentences per batch.", **d)
  flags.DEFINE_integer("max_input_tokens", None, "Longer inputs are "
                       "truncated (default: the run's data.max_len).", **d)
  flags.DEFINE_string("attention_png", None, "Write attention heat maps of "
                      "the (single) input sentence to this PNG.", **d)
  flags.DEFINE_integer("attention_layer", -1, "Layer shown in the PNG.", **d)


def _warn(stderr: TextIO, message: str):
  print(f"warning: {message}", file=stderr, flush=True)


def run(argv: Sequence[str], stdin: BinaryIO, stdout: TextIO,
        stderr: TextIO) -> int:
  """The whole program on explicit streams; returns the exit status."""
  f = evaluate.parse_flags(_define_flags, argv, __doc__)
  if not f.workdir:
    print("error: --workdir is required", file=stderr)
    return 2
  try:
    options = evaluate.DecodeOptions(
        method=f.decoding, beam_size=f.beam_size, alpha=f.alpha,
        max_extra_len=f.max_extra_len, temperature=f.temperature,
        top_k=f.top_k, top_p=f.top_p, seed=f.seed, batch_size=f.batch_size)
    if f.decoding == "sample":
      decoding.filter_logits(jnp.zeros(3), f.temperature, f.top_k,
                                      f.top_p)
  except ValueError as e:
    print(f"error: {e}", file=stderr)
    return 2

  # Read and check all the input before loading anything.
  try:
    if f.input:
      with open(f.input, "rb") as stream:
        lines = read_lines(stream)
    else:
      lines = read_lines(stdin)
  except InputError as e:
    print(f"error: {f.input or '<stdin>'}: {e}", file=stderr)
    return 1
  except OSError as e:
    print(f"error: cannot read --input: {e}", file=stderr)
    return 1
  if f.attention_png and sum(bool(line.strip()) for line in lines) != 1:
    print("error: --attention_png needs exactly one (non-empty) input "
          f"sentence, got {sum(bool(l.strip()) for l in lines)}", file=stderr)
    return 2

  loaded = evaluate.load_params(f.workdir,
                                evaluate.parse_checkpoint(f.checkpoint),
                                f.average_last)
  cfg, tok = loaded.model_config, loaded.tokenizer
  max_tokens = (f.max_input_tokens or
                loaded.experiment_config.get("data", {}).get("max_len") or
                cfg.max_len)
  translations, sources, outputs = evaluate.translate_texts(
      cfg, loaded.params, tok, lines, options, max_tokens,
      on_truncate=lambda i, n: _warn(
          stderr, f"line {i + 1}: {n} tokens (eos included), truncated to "
          f"{min(max_tokens, cfg.max_len)} (--max_input_tokens)"))
  for text in translations:
    stdout.write(text + "\n")
  stdout.flush()

  if f.attention_png:
    [ids], [out] = sources, outputs
    [i] = [j for j, line in enumerate(lines) if line.strip()]
    tgt = np.asarray([list(out) + [EOS_ID]], np.int32)
    weights = jax.jit(attention_weights, static_argnums=0)(cfg, loaded.params,
                                jnp.asarray(ids[None, :]), jnp.asarray(tgt))
    try:
      path = attention_plot.plot_attention(
          f.attention_png, weights, [tok.id_to_piece(t) for t in ids],
          [tok.id_to_piece(t) for t in tgt[0]], layer=f.attention_layer,
          title="\n-> ".join((lines[i], translations[i])))
    except ValueError as e:
      print(f"error: {e}", file=stderr)
      return 2
    print(f"attention maps: {path}", file=stderr)
  return 0


def main(argv: Sequence[str]) -> int:
  return run(argv, sys.stdin.buffer, sys.stdout, sys.stderr)


if __name__ == "__main__":
  sys.exit(main(sys.argv))
