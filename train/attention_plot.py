"""Heat maps of a sentence's attention weights (matplotlib, Agg canvas).

    plot_attention(path, weights, source_tokens, target_tokens, layer=-1)

``weights`` is ``model.attention_weights(...)`` for one sentence pair: a dict
with "encoder_decoder" and "encoder_self", each a list (one per layer) of
[1, heads, queries, keys]. The figure has two rows, the encoder-decoder
attention (target tokens down, source tokens across) and the encoder
self-attention (source x source), each with one panel per head of the chosen
layer and a last panel with the mean over heads.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

ROWS = (("encoder_decoder", "encoder-decoder attention"),
        ("encoder_self", "encoder self-attention"))


def plot_attention(path, weights: dict, source_tokens: Sequence[str],
                   target_tokens: Sequence[str], layer: int = -1,
                   title: str | None = None) -> str:
  """Writes the PNG at path and returns path. See the module docstring."""
  panels = {}
  for key, _ in ROWS:
    per_layer = weights[key]
    if not -len(per_layer) <= layer < len(per_layer):
      raise ValueError(f"layer {layer} does not exist: the model has "
                       f"{len(per_layer)} layers (use 0..{len(per_layer) - 1} "
                       "or -1 for the last)")
    panels[key] = np.asarray(per_layer[layer])[0]  # [heads, q, k]
  heads = panels["encoder_self"].shape[0]
  layer_number = layer % len(weights["encoder_self"])
  labels = {"encoder_decoder": (target_tokens, source_tokens),
            "encoder_self": (source_tokens, source_tokens)}

  cell = 0.28  # inches per token
  side = max(2.5, cell * max(len(source_tokens), len(target_tokens)) + 1.2)
  fig = Figure(figsize=(side * (heads + 1), side * 2 + 0.8))
  FigureCanvasAgg(fig)
  axes = fig.subplots(2, heads + 1, squeeze=False)
  for row, (key, name) in enumerate(ROWS):
    maps = panels[key]
    queries, keys = labels[key]
    maps = maps[:, :len(queries), :len(keys)]
    for column in range(heads + 1):
      ax = axes[row, column]
      is_mean = column == heads
      image = maps.mean(axis=0) if is_mean else maps[column]
      ax.imshow(image, cmap="viridis", vmin=0.0, vmax=max(image.max(), 1e-6),
                aspect="auto", interpolation="nearest")
      ax.set_title(f"{name}\n{'mean of heads' if is_mean else f'head {column}'}",
                   fontsize=9)
      ax.set_xticks(range(len(keys)))
      ax.set_xticklabels(keys, rotation=90, fontsize=7)
      ax.set_yticks(range(len(queries)))
      ax.set_yticklabels(queries, fontsize=7)
  fig.suptitle(title or f"layer {layer_number}", fontsize=11)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  return str(path)
