"""ml_collections experiment configs, one file per experiment.

``base_config()`` below holds every field the trainer reads, with the
paper's defaults; each experiment file's ``get_config()`` starts from it and
changes what it needs (ConfigDicts are locked, so a typo fails loudly).
Model: ``model_preset`` names a ``TransformerConfig`` preset and ``model``
holds field overrides (``vocab_size`` is always set from the tokenizer at
train time). Load one with
``python -m train --config=experiments/configs/<name>.py --workdir=...`` and
override any field with ``--config.<field>=<value>``.

Configs are data: this package imports only ml_collections (the model's
field names and logical axis names appear here as plain strings; the config
test checks them against the model).
"""
import ml_collections

# Every TransformerConfig field (model/config.py) and its type: each gets a
# placeholder in ``config.model`` (None = the preset's value), so any of them
# can be set from the command line, e.g. --config.model.d_ff=512.
MODEL_FIELDS = dict(
    vocab_size=int, target_vocab_size=int, share_embeddings=bool,
    tie_output_embedding=bool, d_model=int, num_heads=int, d_ff=int,
    num_encoder_layers=int, num_decoder_layers=int, dropout_rate=float,
    attention_dropout_rate=float, max_len=int, dtype=str, pre_ln=bool,
    layer_norm_epsilon=float, dropout_impl=str, attention_bias=bool)

# Logical axis names of the model's params and activations -> mesh axes
# (data, fsdp, tensor): batch over data x fsdp, parameters fully sharded over
# fsdp, heads / d_ff / vocabulary over tensor (Megatron-style).
LOGICAL_AXIS_RULES = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
)


def model_overrides(**values) -> ml_collections.ConfigDict:
  """One typed placeholder (None = the preset's value) per model field."""
  c = ml_collections.ConfigDict({
      name: ml_collections.config_dict.placeholder(kind)
      for name, kind in MODEL_FIELDS.items()})
  c.update(values)
  return c


def data_config() -> ml_collections.ConfigDict:
  """`config.data` (train/input_pipeline.py): the offline Bible es→en defaults."""
  c = ml_collections.ConfigDict()
  # "bible_es_en", "wmt14_translate/de-en", "wmt17_translate/de-en" (any tfds
  # name whose features are languages) or "parallel_text".
  c.name = "bible_es_en"
  c.source_lang = "es"  # tfds feature read as source: the direction switch
  c.target_lang = "en"
  c.data_dir = ""  # tfds data_dir (local or gs://); "" = tfds default
  c.train_split = "train"
  c.eval_split = "validation"  # model selection never uses "test"
  c.max_len = 128  # tokens per row, eos included
  c.long_pairs = "drop"  # training pairs longer than max_len: "drop" | "truncate"
  c.seed = 0  # shuffling, packing and SentencePiece sampling
  c.vocab_size = 8000  # upper bound; the tokenizer reports the real size
  c.spm_model_type = "unigram"  # or "bpe", "char", "word"
  c.spm_character_coverage = 1.0  # 0.9995 for large-alphabet languages
  c.spm_max_sentences = 1_000_000  # sentences sampled to train SentencePiece
  c.spm_byte_fallback = True  # unseen characters become UTF-8 byte pieces, not <unk>
  # parallel_text: two line-aligned files, or one source<TAB>target TSV.
  c.train_src_file = ""
  c.train_tgt_file = ""
  c.train_tsv_file = ""
  c.eval_src_file = ""
  c.eval_tgt_file = ""
  c.eval_tsv_file = ""
  c.num_packing_bins = 0  # rows open to best-fit packing at once; 0 = rows per host batch
  # Token ids of each split are cached (train/token_cache.py): "" = beside the
  # data (<data_dir>/<name>/<version>/token_ids/, or the parallel_text files'
  # folder + /token_ids/); any other folder (local or gs://) instead.
  c.token_cache_dir = ""
  c.tokenize_workers = 0  # processes tokenizing a split once; 0 = every core
  # Kept so older command lines still parse; the training input no longer
  # reads through Grain threads, so these have no effect.
  c.read_threads = 2
  c.prefetch_buffer_size = 64
  return c


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  # Model: a TransformerConfig preset plus overrides (see model/config.py).
  c.model_preset = "base"
  # None = the preset's value; any field overridable: --config.model.d_ff=512
  c.model = model_overrides()

  # Data: train/input_pipeline.py's config (dataset, tokenizer, max_len ...).
  c.data = data_config()
  c.batch_size = 64               # global rows per step (packed pairs)
  # Deterministic random batches of the same format instead of the corpus:
  # for tests and throughput checks only.
  c.synthetic_data = False
  # Training batches placed on the devices ahead of their step by a
  # background thread (train/prefetch.py), so an accelerator never waits for
  # the host to place one; 0 = placed by the loop itself.
  c.device_prefetch = 2

  # Loss and optimiser (section 5.3, 5.4).
  c.label_smoothing = 0.1
  c.optimizer = ml_collections.ConfigDict(dict(
      learning_rate_scale=1.0,   # lr = scale * d_model^-0.5 * min(...)
      warmup_steps=4000,
      # 'rsqrt' (the paper's eq. 3) | 'cosine' | 'linear' | 'wsd': warm-up to
      # eq. 3's peak, then decay to final_lr_fraction of it at decay_steps (0:
      # the run's num_train_steps); 'wsd' holds the peak and decays over the
      # last wsd_decay_fraction of the run. Departures, for runs of a known
      # length (train/steps.py, learning_rate_schedule).
      schedule="rsqrt", decay_steps=0, final_lr_fraction=0.0,
      wsd_decay_fraction=0.2,
      adam_b1=0.9, adam_b2=0.98, adam_eps=1e-9,
      grad_clip_norm=0.0,        # 0 = off (the paper does not clip)
      grad_accum_steps=1,        # >1: optax.MultiSteps over micro-batches
      weight_decay=0.0,          # >0: AdamW (departure)
      # >0: also keep an exponential moving average of the params with this
      # decay (train/steps.py, ema_update), read with --ema by evaluate,
      # translate, inspect and export. 0 = off.
      ema_decay=0.0,
  ))

  # Length of training: num_train_steps. max_minutes: a wall-time budget for
  # one launch (data prep + compile included), 0 = none. `python -m train`
  # plans it first (train/plan.py): it times budget_timing_steps steps of a
  # new model after the first, a validation pass and a BLEU pass, then fixes
  # num_train_steps to what the budget holds (never more than the config's;
  # a decaying schedule, decay_steps 0, ends there, its timed steps inside
  # the warm-up); the trainer keeps max_minutes as a safety stop.
  c.num_train_steps = 100_000
  c.max_minutes = 0.0
  c.budget_timing_steps = 20
  # A run of long_run_steps steps or more (num_train_steps, or with
  # max_minutes what the budget holds, planned as above; 0 = never) trains
  # with model.dropout_rate = long_run_dropout_rate (train/run_length.py,
  # dropout_for_length).
  c.long_run_steps = 0
  c.long_run_dropout_rate = 0.1

  # Loop cadence (in steps).
  c.log_every_steps = 50
  c.eval_every_steps = 1000
  c.num_eval_batches = -1          # -1: the whole validation split
  c.eval_bleu_every_steps = 0      # 0 = off
  c.eval_bleu_num_batches = 8      # eval batches decoded (from the start)
  c.eval_bleu_beam_size = 4        # 1 = greedy
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
  c.logical_axis_rules = [list(r) for r in LOGICAL_AXIS_RULES]
  c.distributed = ml_collections.ConfigDict(dict(
      enabled=False, coordinator_address="", num_processes=-1,
      process_id=-1, cpu_collectives=""))
  return c
