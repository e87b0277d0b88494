"""wmt14_en_de_base: the paper's base model on WMT 2014 English->German.

Exactly the paper's settings (Vaswani et al. 2017, sections 5 and 6.1, Table 3):
  * shared source-target vocabulary of ~37k tokens (SentencePiece BPE here;
    the paper used byte-pair encoding), embeddings tied with the softmax;
  * batches of ~25k source + ~25k target tokens: 112 packed rows of 256
    tokens (~0.9 of each row is real tokens after packing);
  * 100k steps, warmup 4000, lr = d_model^-0.5 * min(step^-0.5, step * 4000^-1.5);
  * Adam(0.9, 0.98, 1e-9), dropout 0.1, label smoothing 0.1;
  * evaluation on newstest2014 (tfds `test`) with beam 4, alpha 0.6, max
    output length input + 50, averaging the last 5 checkpoints (written every
    ~10 minutes in the paper: here every 1,400 steps); model selection on
    newstest2013 (tfds `validation`).
On a TPU VM: experiments/tpu_vm/launch.sh --config experiments/configs/wmt14_en_de_base.py.
batch_size must be a multiple of the devices on the data x fsdp mesh axes.
"""

from experiments.configs import base_config


def get_config():
  c = base_config()
  c.model_preset = "base"
  c.data.name = "wmt14_translate/de-en"
  c.data.source_lang = "en"
  c.data.target_lang = "de"
  c.data.vocab_size = 37000
  c.data.spm_model_type = "bpe"
  c.data.spm_max_sentences = 2_000_000
  c.data.max_len = 256
  c.data.long_pairs = "drop"
  c.batch_size = 112
  c.label_smoothing = 0.1
  c.optimizer.warmup_steps = 4000
  c.optimizer.learning_rate_scale = 1.0
  c.num_train_steps = 100_000
  c.log_every_steps = 100
  c.eval_every_steps = 1400
  c.eval_bleu_every_steps = 7000
  c.eval_bleu_num_batches = 16
  c.eval_bleu_beam_size = 4
  c.eval_bleu_alpha = 0.6
  c.checkpoint_every_steps = 1400
  c.checkpoint.max_to_keep = 5     # the last 5 are averaged for evaluation
  c.checkpoint.keep_best = 1
  return c
