"""tiny: the `tiny` model preset, for tests and smoke runs (seconds on a CPU).

A step takes a few milliseconds; the loop, evaluation and checkpointing run
often so a short run exercises all of them.
"""

from experiments.configs import base_config


def get_config():
  c = base_config()
  c.model_preset = "tiny"
  c.data.max_len = 32
  c.data.vocab_size = 256
  c.batch_size = 16
  c.optimizer.warmup_steps = 100
  c.optimizer.learning_rate_scale = 2.0
  c.num_train_steps = 200
  c.log_every_steps = 10
  c.eval_every_steps = 50
  c.num_eval_batches = 4
  c.checkpoint_every_steps = 50
  c.checkpoint.max_to_keep = 2
  return c
