"""wmt17_de_en: German->English on WMT 2017, as the Flax WMT example trains it.

The direction, data and shape of Flax's examples/wmt default config, so
results can be compared: tfds `wmt17_translate/de-en` read de->en, a joint
32k SentencePiece vocabulary, the "big" shape (d_model 1024, 16 heads, d_ff
4096, 6+6 layers) with dropout 0.1, 256 packed rows of 256 tokens, 250k
steps, warmup 1000 and a peak learning rate of ~2e-3 (the example's
0.0625 * rsqrt(step) at step 1000; here scale 2.0 * 1024^-0.5 * 1000^-0.5).
Differences from the example: our BLEU is sacreBLEU (cased, 13a) on
detokenised text, and model selection uses newstest2016 (validation), never
the test set.
"""

from experiments.configs import base_config


def get_config():
  c = base_config()
  c.model_preset = "big"
  c.model.dropout_rate = 0.1
  c.data.name = "wmt17_translate/de-en"
  c.data.source_lang = "de"
  c.data.target_lang = "en"
  c.data.vocab_size = 32000
  c.data.spm_max_sentences = 2_000_000
  c.data.max_len = 256
  c.batch_size = 256
  c.optimizer.warmup_steps = 1000
  c.optimizer.learning_rate_scale = 2.0
  c.num_train_steps = 250_000
  c.log_every_steps = 100
  c.eval_every_steps = 2000
  c.eval_bleu_every_steps = 10000
  c.eval_bleu_num_batches = 16
  c.checkpoint_every_steps = 2000
  c.checkpoint.max_to_keep = 5
  return c
