"""wmt14_en_de_big: the paper's big model on WMT 2014 English->German.

As wmt14_en_de_base.py, with Table 3's "big" row: d_model 1024, 16 heads,
d_ff 4096, dropout 0.3, 300k steps, and the average of the last 20
checkpoints (written every ~10 minutes in the paper: here every 600 steps).
Memory: with float32 Adam states the big model wants fsdp sharding on small
chips, e.g. `-- --config.mesh.fsdp=4`.
"""

from experiments.configs import wmt14_en_de_base


def get_config():
  c = wmt14_en_de_base.get_config()
  c.model_preset = "big"
  c.model.dropout_rate = 0.3
  c.num_train_steps = 300_000
  c.eval_every_steps = 3000
  c.eval_bleu_every_steps = 15000
  c.checkpoint_every_steps = 600
  c.checkpoint.max_to_keep = 20    # the last 20 are averaged for evaluation
  return c
