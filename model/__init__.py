"""The Transformer of "Attention Is All You Need": pure model code, no I/O."""

from model.config import (EOS_ID, PAD_ID, PRESETS, ConfigError,
                          TransformerConfig)
from model.layers import sinusoidal_table
from model.transformer import (Transformer, attention_weights, init_cache,
                               init_params, shift_right)

__all__ = [
    "ConfigError", "EOS_ID", "PAD_ID", "PRESETS",
    "Transformer", "TransformerConfig", "attention_weights", "init_cache",
    "init_params", "shift_right", "sinusoidal_table",
]
