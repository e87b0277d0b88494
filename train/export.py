"""Export a trained model to CTranslate2, for fast CPU serving.

    python -m train.export --workdir=<dir> [--checkpoint=latest|best|<step>]
        [--average_last=N] [--ema] --format=ctranslate2 --output=<dir>
        [--overwrite]

Writes a CTranslate2 model directory (``model.bin``, ``config.json`` and the
shared vocabulary) built with CTranslate2's own spec API
(``ctranslate2.specs.TransformerSpec``) from the params that
``train.inference.load`` returns, and copies the run's SentencePiece model
beside it as ``spm.model``. Needs ``pip install -e ".[export]"``.

The export keeps the model's numbers: shared or separate embeddings scaled
by sqrt(d_model), this project's sinusoidal table (sines and cosines
interleaved, written out since CTranslate2's built-in table concatenates
them), post-LN or pre-LN blocks with their epsilon, attention biases where
the params have them, and the decoder start token: our decoder starts from
the pad id 0 (``<pad>``). Sources are the SentencePiece pieces followed by
``</s>``; translate with ``min_decoding_length=1`` to keep this project's
rule that a non-empty source never gets an empty translation.

Serving::

    import ctranslate2, sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file="<output>/spm.model")
    translator = ctranslate2.Translator("<output>", compute_type="int8")
    pieces = [sp.encode(s, out_type=str) + ["</s>"] for s in sentences]
    results = translator.translate_batch(pieces, beam_size=4, min_decoding_length=1)
    [sp.decode(r.hypotheses[0]) for r in results]
"""

from __future__ import annotations

import shutil
import sys
from typing import Any, Sequence

import numpy as np
from absl import flags
from etils import epath

import tokenizer as tokenizer_lib
from model import TransformerConfig, sinusoidal_table
from train import cli, inference

FORMATS = ("ctranslate2",)
MIN_POSITIONS = 1024
SPM_FILE = "spm.model"


def _dense(kernel: np.ndarray, bias: np.ndarray | None, in_axes: int):
  """A (DenseGeneral) kernel [in..., out...] -> CTranslate2's [out, in]."""
  kernel = np.asarray(kernel, np.float32)
  n_in = int(np.prod(kernel.shape[:in_axes]))
  weight = kernel.reshape(n_in, -1).T
  return weight, None if bias is None else np.asarray(bias, np.float32).reshape(-1)


def _set_linear(spec, weight: np.ndarray, bias: np.ndarray | None) -> None:
  spec.weight = np.ascontiguousarray(weight)
  if bias is not None:
    spec.bias = bias


def _projections(p: dict[str, Any], names: Sequence[str]):
  """Fused [out, in] weight (and bias) of several projections (q, k, v)."""
  parts = [_dense(p[n]["kernel"], p[n].get("bias"), 1) for n in names]
  weight = np.concatenate([w for w, _ in parts], axis=0)
  if parts[0][1] is None:
    return weight, None
  return weight, np.concatenate([b for _, b in parts])


def _set_attention(spec, p: dict[str, Any], self_attention: bool) -> None:
  if self_attention:
    _set_linear(spec.linear[0], *_projections(p, ("query", "key", "value")))
  else:
    _set_linear(spec.linear[0], *_projections(p, ("query",)))
    _set_linear(spec.linear[1], *_projections(p, ("key", "value")))
  _set_linear(spec.linear[-1], *_dense(p["out"]["kernel"],
                                       p["out"].get("bias"), 2))


def _set_norm(spec, p: dict[str, Any]) -> None:
  spec.gamma = np.asarray(p["scale"], np.float32)
  spec.beta = np.asarray(p["bias"], np.float32)


def _set_ffn(spec, p: dict[str, Any], norm: dict[str, Any]) -> None:
  _set_norm(spec.layer_norm, norm)
  _set_linear(spec.linear_0, *_dense(p["wi"]["kernel"], p["wi"]["bias"], 1))
  _set_linear(spec.linear_1, *_dense(p["wo"]["kernel"], p["wo"]["bias"], 1))


def _embeddings(params, config: TransformerConfig):
  """(source table, target table, output projection [vocab, d_model])."""
  if config.share_embeddings:
    table = np.asarray(params["shared_embedding"]["embedding"], np.float32)
    return table, table, table
  source = np.asarray(params["source_embedding"]["embedding"], np.float32)
  target = np.asarray(params["target_embedding"]["embedding"], np.float32)
  if config.tie_output_embedding:
    return source, target, target
  return source, target, np.asarray(
      params["output_projection"]["kernel"], np.float32).T


def build_spec(config: TransformerConfig, params, vocabulary: list[str]):
  """A ``ctranslate2.specs.TransformerSpec`` holding the model's weights.

  vocabulary: the piece of every id (joint source and target vocabulary).
  """
  from ctranslate2.specs import transformer_spec  # pylint: disable=g-import-not-at-top
  spec = transformer_spec.TransformerSpec.from_config(
      (config.num_encoder_layers, config.num_decoder_layers),
      config.num_heads, pre_norm=config.pre_ln)
  source, target, output = _embeddings(params, config)
  spec.encoder.embeddings[0].weight = source
  spec.decoder.embeddings.weight = target
  spec.encoder.scale_embeddings = True   # section 3.4: times sqrt(d_model)
  spec.decoder.scale_embeddings = True
  # The table's formula holds at any position: a longer one lets CTranslate2
  # run to its own length limits (max_decoding_length defaults to 256).
  table = sinusoidal_table(max(config.max_len, MIN_POSITIONS), config.d_model)
  spec.encoder.position_encodings.encodings = table
  spec.decoder.position_encodings.encodings = table
  spec.decoder.projection.weight = output

  enc, dec = params["encoder"], params["decoder"]
  for i, layer in enumerate(spec.encoder.layer):
    p = enc[f"layers_{i}"]
    _set_attention(layer.self_attention, p["self_attention"], True)
    _set_norm(layer.self_attention.layer_norm, p["self_attention_norm"])
    _set_ffn(layer.ffn, p["ffn"], p["ffn_norm"])
  for i, layer in enumerate(spec.decoder.layer):
    p = dec[f"layers_{i}"]
    _set_attention(layer.self_attention, p["self_attention"], True)
    _set_norm(layer.self_attention.layer_norm, p["self_attention_norm"])
    _set_attention(layer.attention, p["cross_attention"], False)
    _set_norm(layer.attention.layer_norm, p["cross_attention_norm"])
    _set_ffn(layer.ffn, p["ffn"], p["ffn_norm"])
  if config.pre_ln:
    _set_norm(spec.encoder.layer_norm, enc["final_norm"])
    _set_norm(spec.decoder.layer_norm, dec["final_norm"])

  spec.config.layer_norm_epsilon = config.layer_norm_epsilon
  spec.config.unk_token = vocabulary[tokenizer_lib.UNK_ID]
  spec.config.eos_token = vocabulary[tokenizer_lib.EOS_ID]
  # Our decoder starts from the pad id (the right shift inserts id 0).
  spec.config.decoder_start_token = vocabulary[tokenizer_lib.PAD_ID]
  spec.config.bos_token = vocabulary[tokenizer_lib.PAD_ID]
  spec.register_source_vocabulary(vocabulary)
  spec.register_target_vocabulary(vocabulary)
  spec.validate()
  return spec


def vocabulary_of(tok: tokenizer_lib.Tokenizer, size: int) -> list[str]:
  """Piece i for every id i < size (ids past the tokenizer's: placeholders)."""
  pieces = [tok.id_to_piece(i) for i in range(tok.vocab_size)]
  return pieces + [f"<unused_{i}>" for i in range(len(pieces), size)]


def export_ctranslate2(loaded: inference.LoadedModel, output) -> epath.Path:
  """Writes the CTranslate2 model and the SentencePiece model to ``output``."""
  config = loaded.model_config
  if not config.share_embeddings:
    raise ValueError("the export supports the joint vocabulary of this "
                     "project's runs (share_embeddings=True)")
  vocabulary = vocabulary_of(loaded.tokenizer, config.vocab_size)
  spec = build_spec(config, loaded.params, vocabulary)
  output = epath.Path(output)
  output.mkdir(parents=True, exist_ok=True)
  spec.save(str(output))
  (output / SPM_FILE).write_bytes(loaded.tokenizer.model_proto)
  return output


# ---------------------------------------------------------------- the command

def _define_flags(fv: flags.FlagValues):
  cli.define_model_flags(fv)
  d = dict(flag_values=fv)
  flags.DEFINE_enum("format", "ctranslate2", list(FORMATS), "Export format.",
                    **d)
  flags.DEFINE_string("output", None, "Directory to write the model to.", **d)
  flags.DEFINE_bool("overwrite", False, "Replace a non-empty --output.", **d)


def main(argv: Sequence[str]) -> int:
  f = cli.parse_flags(_define_flags, argv, __doc__)
  choice = cli.model_choice(f)
  if not f.output:
    raise cli.UsageError("--output is required: the directory to write the "
                         "CTranslate2 model to")
  output = epath.Path(f.output)
  if output.exists() and any(output.iterdir()) and not f.overwrite:
    raise cli.UsageError(f"--output={f.output} exists and is not empty; "
                         "pass --overwrite to replace it")
  try:
    import ctranslate2  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    raise cli.UsageError('ctranslate2 is not installed: pip install -e '
                         '".[export]"') from None
  loaded = inference.load(*choice)
  if output.exists() and f.overwrite:
    shutil.rmtree(output)
  path = export_ctranslate2(loaded, output)
  steps = inference.checkpoint_tag(loaded.steps, loaded.ema)
  print(f"CTranslate2 model of {f.workdir} ({steps}) in {path}; "
        f"SentencePiece model: {path / SPM_FILE}")
  return 0


if __name__ == "__main__":
  sys.exit(cli.run_command(main, sys.argv))
