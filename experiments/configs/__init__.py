"""ml_collections experiment configs, one file per experiment.

``base_config()`` below holds every field the trainer reads, with the
paper's defaults; each experiment file's ``get_config()`` starts from it and
changes what it needs (ConfigDicts are locked, so a typo fails loudly).
Model: ``model_preset`` names a ``TransformerConfig`` preset and ``model``
holds field overrides (``vocab_size`` is always set from the tokenizer at
train time). Load one with
``python -m train --config=experiments/configs/<name>.py --workdir=...`` and
override any field with ``--config.<field>=<value>``.
"""
import dataclasses

import ml_collections

from model import DEFAULT_LOGICAL_AXIS_RULES, TransformerConfig
from train import input_pipeline


_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


def model_overrides(**values) -> ml_collections.ConfigDict:
  """One typed placeholder (None = the preset's value) per TransformerConfig
  field, so any of them can be set from the command line."""
  fields = {}
  for field in dataclasses.fields(TransformerConfig):
    kind = _TYPES[str(field.type).split("|")[0].strip()]
    fields[field.name] = ml_collections.config_dict.placeholder(kind)
  c = ml_collections.ConfigDict(fields)
  c.update(values)
  return c


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  # Model: a TransformerConfig preset plus overrides (see model/config.py).
  c.model_preset = "base"
  # None = the preset's value; any field overridable: --config.model.d_ff=512
  c.model = model_overrides()

  # Data: train/input_pipeline.py's config (dataset, tokenizer, max_len ...).
  c.data = input_pipeline.default_data_config()
  c.batch_size = 64               # global rows per step (packed pairs)
  # Deterministic random batches of the same format instead of the corpus:
  # for tests and throughput checks only.
  c.synthetic_data = False

  # Loss and optimiser (section 5.3, 5.4).
  c.label_smoothing = 0.1
  c.optimizer = ml_collections.ConfigDict(dict(
      learning_rate_scale=1.0,   # lr = scale * d_model^-0.5 * min(...)
      warmup_steps=4000,
      adam_b1=0.9, adam_b2=0.98, adam_eps=1e-9,
      grad_clip_norm=0.0,        # 0 = off (the paper does not clip)
      grad_accum_steps=1,        # >1: optax.MultiSteps over micro-batches
      weight_decay=0.0,          # >0: AdamW (departure)
  ))

  # Length of training: whichever comes first. max_minutes: wall time of one
  # launch (data prep + compile included), 0 = no budget.
  c.num_train_steps = 100_000
  c.max_minutes = 0.0

  # Loop cadence (in steps).
  c.log_every_steps = 50
  c.eval_every_steps = 1000
  c.num_eval_batches = -1          # -1: the whole validation split
  c.eval_bleu_every_steps = 0      # 0 = off; needs train/evaluate.py
  c.eval_bleu_num_batches = 8      # eval batches decoded (from the start)
  c.eval_bleu_beam_size = 4        # 1 = greedy (train/evaluate.py)
  c.eval_bleu_alpha = 0.6
  c.eval_bleu_max_extra_len = 50
  c.checkpoint_every_steps = 1000

  c.checkpoint = ml_collections.ConfigDict(dict(
      max_to_keep=3,               # the last N checkpoints ...
      keep_best=1,                 # ... plus the best by best_metric
      best_metric="auto",          # 'auto': eval_bleu if BLEU runs, else eval_loss
      best_mode="auto",            # 'min' | 'max' | 'auto' (from the name)
      async_save=True,
  ))

  # Placement (train/sharding.py).
  c.parallelism = "jit"            # 'jit' (mesh) | 'pmap' (data parallel)
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.logical_axis_rules = [list(r) for r in DEFAULT_LOGICAL_AXIS_RULES]
  c.distributed = ml_collections.ConfigDict(dict(
      enabled=False, coordinator_address="", num_processes=-1,
      process_id=-1, cpu_collectives=""))
  return c
