"""Translate sentences with a trained model: stdin (or --input) to stdout.

    python -m train.translate --workdir=<dir> [--input=file]
        [--decoding=beam|greedy|sample] [--beam_size=4] [--alpha=0.6]
        [--temperature=1 --top_k=0 --top_p=1 --seed=0]
        [--checkpoint=latest|best|<step>] [--average_last=N] [--ema]
        [--attention_png=attn.png [--attention_layer=-1]]

One sentence a line in, one translation a line out, same order (decoded in
length-bucketed batches). An empty line gives an empty line. A line longer
than --max_input_tokens (default: the run's data.max_len) is truncated, with a
warning on stderr naming its line number. Input that is not UTF-8 stops the
program before anything is translated, naming the line; exit status 1.
Exit status 0 on success, 2 on a usage error (a bad flag, a workdir without
checkpoints, an unreadable --input: one line on stderr, before the model
loads).

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

from model import EOS_ID, attention_weights
from train import attention_plot, checkpointing, cli, inference
from train.translation import translate_texts


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
  cli.define_model_flags(fv)
  cli.define_decode_flags(fv)
  d = dict(flag_values=fv)
  flags.DEFINE_string("input", None, "Source file (default: stdin).", **d)
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
  try:
    f = cli.parse_flags(_define_flags, argv, __doc__)
    # First: reading the run's config through Orbax starts JAX's backend.
    devices = cli.decoding_devices(f.decode_devices)
    choice = cli.model_choice(f)
    options = cli.decode_options(f)
    if f.max_input_tokens is not None and f.max_input_tokens < 2:
      raise cli.UsageError(f"--max_input_tokens={f.max_input_tokens}: use at "
                           "least 2 (one token and eos)")
  except cli.UsageError as e:
    print(f"error: {e}", file=stderr)
    return cli.USAGE_EXIT

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
    print(f"error: --input={f.input}: cannot read it ({e.strerror or e})",
          file=stderr)
    return cli.USAGE_EXIT
  if f.attention_png and sum(bool(line.strip()) for line in lines) != 1:
    print("error: --attention_png needs exactly one (non-empty) input "
          f"sentence, got {sum(bool(l.strip()) for l in lines)}", file=stderr)
    return 2

  loaded = inference.load(*choice)
  cfg, tok = loaded.model_config, loaded.tokenizer
  for number, line in enumerate(lines, start=1):
    unknown = tok.unknown_characters(line)
    if unknown:
      _warn(stderr, f"line {number}: {''.join(unknown)!r} not in the "
            "vocabulary: translated as <unk> (the tokenizer has no byte "
            "fallback)")
  max_tokens = (f.max_input_tokens or
                loaded.experiment_config.get("data", {}).get("max_len") or
                cfg.max_len)
  translations, sources, outputs = translate_texts(
      cfg, loaded.params, tok, lines, options, max_tokens,
      on_truncate=lambda i, n: _warn(
          stderr, f"line {i + 1}: {n} tokens (eos included), truncated to "
          f"{min(max_tokens, cfg.max_len)} (--max_input_tokens)"),
      devices=devices)
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
  checkpointing.quiet_abandoned_checkpoint_io()
  cli.use_compilation_cache()
  return run(argv, sys.stdin.buffer, sys.stdout, sys.stderr)


if __name__ == "__main__":
  sys.exit(main(sys.argv))
