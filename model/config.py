"""TransformerConfig: every hyper-parameter of the model, frozen and validated.

The defaults are the paper's base model (Vaswani et al. 2017, Table 3, row
"base"); the named presets are the shapes this project uses. Every departure
from the paper is a named field whose default is the paper's choice.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

# The vocabulary's special ids are the tokenizer's (defined once there): 0 is
# padding and the decoder's start token after the right shift, 1 is
# end-of-sentence.
from tokenizer.spm import EOS_ID, PAD_ID

NUM_SPECIAL_IDS = 2

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class ConfigError(ValueError):
  """An impossible model configuration; the message names the field."""


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Hyper-parameters of the encoder-decoder Transformer.

  Attributes:
    vocab_size: size of the source vocabulary; with a joint vocabulary (the
      paper's setting) also the target vocabulary.
    target_vocab_size: size of a separate target vocabulary, or None for a
      joint one.
    share_embeddings: one matrix for source embeddings, target embeddings and
      the pre-softmax projection (section 3.4). Needs a joint vocabulary.
    tie_output_embedding: with separate vocabularies, tie the pre-softmax
      projection to the target embedding (still section 3.4's idea).
    d_model, num_heads, d_ff: widths (section 3.2.2 and 3.3).
    num_encoder_layers, num_decoder_layers: N in the paper.
    dropout_rate: P_drop, on every sub-layer output and on the embedding sums.
    attention_dropout_rate: dropout on attention weights (0 in the paper).
    max_len: longest sequence the positional-encoding table covers.
    dtype: compute dtype, "float32" (default) or "bfloat16" (parameters stay
      float32 in either case). A departure when not float32: every matmul
      (projections, FFN, attention scores and values, tied logits) takes
      inputs in this dtype but accumulates and returns float32
      (``preferred_element_type``, see ``layers.dot_general``); the attention
      softmax and the logits are float32.
    pre_ln: departure: LayerNorm before each sub-layer (x + Sublayer(LN(x)))
      with a final LayerNorm, instead of the paper's post-LN.
    layer_norm_epsilon: epsilon of every LayerNorm.
    dropout_impl: "flax" (default): ``nn.Dropout``, one 32-bit draw per
      element. "paired_bits" (speed path): one 32-bit draw per two elements,
      16 bits each (``layers.PairedBitsDropout``); same rate, different masks.
    attention_bias: departure when True: biases on the attention projections
      (W^Q, W^K, W^V, W^O). Section 3.2.2 has none, nor have tensor2tensor
      and Flax's examples/wmt.
  """

  vocab_size: int = 37000
  target_vocab_size: int | None = None
  share_embeddings: bool = True
  tie_output_embedding: bool = True
  d_model: int = 512
  num_heads: int = 8
  d_ff: int = 2048
  num_encoder_layers: int = 6
  num_decoder_layers: int = 6
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.0
  max_len: int = 512
  dtype: str = "float32"
  pre_ln: bool = False
  layer_norm_epsilon: float = 1e-6
  dropout_impl: str = "flax"
  attention_bias: bool = False

  def __post_init__(self):
    def fail(field, reason):
      raise ConfigError(f"TransformerConfig.{field}: {reason}")

    for field in ("vocab_size", "d_model", "num_heads", "d_ff", "max_len"):
      if getattr(self, field) <= 0:
        fail(field, f"must be positive, got {getattr(self, field)}")
    for field in ("num_encoder_layers", "num_decoder_layers"):
      if getattr(self, field) < 1:
        fail(field, f"needs at least one layer, got {getattr(self, field)}")
    if self.d_model % self.num_heads:
      fail("num_heads", f"d_model={self.d_model} is not divisible by "
           f"num_heads={self.num_heads}; choose a divisor of d_model")
    for field in ("vocab_size", "target_vocab_size"):
      size = getattr(self, field)
      if size is not None and size <= NUM_SPECIAL_IDS:
        fail(field, f"{size} leaves no room for real tokens besides the "
             f"{NUM_SPECIAL_IDS} special ids (pad={PAD_ID}, eos={EOS_ID})")
    if self.share_embeddings and self.target_vocab_size not in (
        None, self.vocab_size):
      fail("share_embeddings", "a shared embedding needs a joint vocabulary, "
           f"but target_vocab_size={self.target_vocab_size} != vocab_size="
           f"{self.vocab_size}; set share_embeddings=False or drop "
           "target_vocab_size")
    for field in ("dropout_rate", "attention_dropout_rate"):
      rate = getattr(self, field)
      if not 0.0 <= rate < 1.0:
        fail(field, f"must lie in [0, 1), got {rate}")
    if self.dtype not in _DTYPES:
      fail("dtype", f"{self.dtype!r} is not one of {sorted(_DTYPES)}")
    if self.dropout_impl not in ("flax", "paired_bits"):
      fail("dropout_impl", f"{self.dropout_impl!r} is not one of "
           "['flax', 'paired_bits']")
    if self.layer_norm_epsilon <= 0:
      fail("layer_norm_epsilon", f"must be positive, got "
           f"{self.layer_norm_epsilon}")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def output_vocab_size(self) -> int:
    return self.target_vocab_size or self.vocab_size

  @property
  def compute_dtype(self):
    return _DTYPES[self.dtype]

  def replace(self, **changes: Any) -> TransformerConfig:
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> TransformerConfig:
    """A saved record (``to_dict``); a field it predates gets the value the
    model had before the field existed (``FIELDS_ADDED_LATER``)."""
    return cls._checked({**FIELDS_ADDED_LATER, **values})

  @classmethod
  def _checked(cls, values: dict[str, Any]) -> TransformerConfig:
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
      raise ConfigError(f"TransformerConfig has no field(s) {unknown}; "
                        f"known fields: {sorted(fields)}")
    return cls(**values)

  @classmethod
  def preset(cls, name: str, **overrides: Any) -> TransformerConfig:
    """A named preset (see PRESETS), with any field overridden."""
    if name not in PRESETS:
      raise ConfigError(f"unknown preset {name!r}; choose one of "
                        f"{sorted(PRESETS)}")
    return cls._checked({**PRESETS[name], **overrides})


# What the model did before each of these fields existed: records saved
# then (checkpoints' "model" item) lack them and load with these values.
FIELDS_ADDED_LATER: dict[str, Any] = {"attention_bias": True}


PRESETS: dict[str, dict[str, Any]] = {
    # For tests: compiles and runs in well under a second on a CPU.
    "tiny": dict(vocab_size=64, d_model=32, num_heads=4, d_ff=64,
                 num_encoder_layers=2, num_decoder_layers=2, max_len=128),
    # The CPU experiment on the offline Spanish-English corpus
    # (bible_es_en narrows it to d_model 192, d_ff 768).
    "small": dict(vocab_size=8000, d_model=256, num_heads=4, d_ff=1024,
                  num_encoder_layers=3, num_decoder_layers=3, max_len=256),
    # The paper's Table 3, with its shared 37k WMT14 en-de vocabulary.
    "base": dict(vocab_size=37000, d_model=512, num_heads=8, d_ff=2048,
                 num_encoder_layers=6, num_decoder_layers=6, dropout_rate=0.1),
    "big": dict(vocab_size=37000, d_model=1024, num_heads=16, d_ff=4096,
                num_encoder_layers=6, num_decoder_layers=6, dropout_rate=0.3),
}
