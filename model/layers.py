"""Building blocks of the Transformer: positional encoding, attention, FFN.

Every parameter carries logical axis names (``nn.with_logical_partitioning``)
and activations at layer boundaries carry logical constraints, so a training
setup can shard both by a rules table (see ``DEFAULT_LOGICAL_AXIS_RULES``).

Parameter axis names: ``vocab``, ``embed`` (d_model), ``heads``, ``kv``
(head_dim), ``mlp`` (d_ff). Activation axis names: ``activation_batch``,
``activation_length``, ``activation_embed``, ``activation_mlp``,
``activation_vocab``.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from model.config import TransformerConfig

# A mesh with axes (data, fsdp, tensor): batch over data x fsdp, parameters
# fully sharded over fsdp, heads / d_ff / vocabulary over tensor (Megatron).
DEFAULT_LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("activation_heads", "tensor"),
    ("activation_vocab", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
)

BLD = ("activation_batch", "activation_length", "activation_embed")


def constrain(x, names=BLD):
  """Logical sharding constraint on an activation (no-op without rules)."""
  return nn.with_logical_constraint(x, names)


def _partitioned(init: Callable, names: tuple[str, ...]) -> Callable:
  return nn.with_logical_partitioning(init, names)


def sinusoidal_table(max_len: int, d_model: int) -> np.ndarray:
  """Section 3.5: PE(pos, 2i) = sin(pos / 10000^(2i/d_model)), PE(pos, 2i+1) = cos(...).

  Returns float32 [max_len, d_model], sines and cosines interleaved as written.
  """
  positions = np.arange(max_len, dtype=np.float64)[:, None]
  two_i = np.arange(0, d_model, 2, dtype=np.float64)[None, :]
  angles = positions / np.power(10000.0, two_i / d_model)
  table = np.zeros((max_len, d_model), dtype=np.float64)
  table[:, 0::2] = np.sin(angles)
  table[:, 1::2] = np.cos(angles[:, : d_model // 2])
  return table.astype(np.float32)


def embedding(config: TransformerConfig, num_embeddings: int, name: str) -> nn.Embed:
  # Normal(0, d_model^-0.5): after the sqrt(d_model) scaling of section 3.4 the
  # inputs have unit variance, and the tied output logits start small.
  return nn.Embed(
      num_embeddings=num_embeddings,
      features=config.d_model,
      dtype=config.compute_dtype,
      param_dtype=jnp.float32,
      embedding_init=_partitioned(
          nn.initializers.normal(stddev=config.d_model**-0.5), ("vocab", "embed")),
      name=name)


def embed_tokens(config: TransformerConfig, embed: nn.Embed, tokens, positions,
                 dropout: nn.Dropout, deterministic: bool):
  """Token embedding * sqrt(d_model) + positional encoding, then dropout.

  tokens, positions: int [batch, length] -> [batch, length, d_model].
  """
  length = tokens.shape[-1]
  if length > config.max_len:
    raise ValueError(
        f"sequence length {length} exceeds TransformerConfig.max_len="
        f"{config.max_len}; raise max_len or truncate the inputs")
  x = embed(tokens) * jnp.sqrt(config.d_model).astype(config.compute_dtype)
  table = jnp.asarray(sinusoidal_table(config.max_len, config.d_model))
  x = x + table[positions].astype(config.compute_dtype)
  x = dropout(x, deterministic=deterministic)
  return constrain(x)


def attention(config: TransformerConfig, name: str, decode: bool = False
              ) -> nn.MultiHeadDotProductAttention:
  """Multi-head attention of section 3.2.2, projections with biases."""
  xavier = nn.initializers.xavier_uniform()
  zeros = nn.initializers.zeros_init()
  return nn.MultiHeadDotProductAttention(
      num_heads=config.num_heads,
      dtype=config.compute_dtype,
      param_dtype=jnp.float32,
      dropout_rate=config.attention_dropout_rate,
      kernel_init=_partitioned(xavier, ("embed", "heads", "kv")),
      bias_init=_partitioned(zeros, ("heads", "kv")),
      out_kernel_init=_partitioned(xavier, ("heads", "kv", "embed")),
      out_bias_init=_partitioned(zeros, ("embed",)),
      decode=decode,
      name=name)


class FeedForward(nn.Module):
  """Section 3.3: FFN(x) = max(0, x W1 + b1) W2 + b2."""

  config: TransformerConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    dense = lambda features, names, name: nn.Dense(
        features,
        dtype=cfg.compute_dtype,
        param_dtype=jnp.float32,
        kernel_init=_partitioned(nn.initializers.xavier_uniform(), names),
        bias_init=_partitioned(nn.initializers.zeros_init(), names[1:]),
        name=name)
    h = nn.relu(dense(cfg.d_ff, ("embed", "mlp"), "wi")(x))
    h = constrain(h, ("activation_batch", "activation_length", "activation_mlp"))
    return dense(cfg.d_model, ("mlp", "embed"), "wo")(h)


def layer_norm(config: TransformerConfig, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=config.layer_norm_epsilon,
      dtype=config.compute_dtype,
      param_dtype=jnp.float32,
      scale_init=_partitioned(nn.initializers.ones_init(), ("embed",)),
      bias_init=_partitioned(nn.initializers.zeros_init(), ("embed",)),
      name=name)


def residual(config: TransformerConfig, name: str, x, sublayer: Callable,
             deterministic: bool):
  """Section 5.4: LayerNorm(x + Dropout(Sublayer(x))), or pre-LN if configured.

  Call from inside a compact method: the LayerNorm is created in the caller's
  scope under ``<name>_norm``.
  """
  norm = layer_norm(config, f"{name}_norm")
  drop = nn.Dropout(rate=config.dropout_rate)
  if config.pre_ln:
    return x + drop(sublayer(norm(x)), deterministic=deterministic)
  return norm(x + drop(sublayer(x), deterministic=deterministic))
