"""Sentences in, translations out: decode options, length-bucketed batches.

    options = DecodeOptions(method="beam", beam_size=4, alpha=0.6)
    translations, source_ids, output_ids = translate_texts(
        model_config, params, tokenizer, sentences, options)

Sources are sorted by length and cut into batches padded to a few length
buckets (``make_batches``), so a whole split compiles the search a handful of
times; outputs come back in the input order. With several ``devices`` the
batches are spread over them, one host thread each (``decode_ids``). Used by
train.evaluate, train.translate, the trainer's validation BLEU and the
benchmarks.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import queue
import threading
from typing import Callable, Sequence

import jax
import numpy as np

import tokenizer as tokenizer_lib
from model import EOS_ID, PAD_ID, TransformerConfig, decoding

# Source lengths are padded up to one of these, so a whole split compiles the
# decoder a handful of times only (per bucket, one compilation for each cache
# length its batches reach, decoding.cache_lengths, and each batch size the
# search shrinks to there, at most three: decoding.compacted_rows). The
# encoder itself runs over each batch's longest source rounded up to 8
# positions (decoding.encoder_length): one small program per multiple. On an
# accelerator (decoding's device mode) a search is one program per batch
# shape: one per bucket.
LENGTH_BUCKETS = (16, 32, 64, 128, 256)
METHODS = ("beam", "greedy", "sample")


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
  """How to decode. The defaults are the paper's (beam 4, alpha 0.6, +50)."""

  method: str = "beam"          # beam | greedy | sample
  beam_size: int = 4
  alpha: float = 0.6
  max_extra_len: int = 50       # output tokens allowed beyond the source's
  temperature: float = 1.0      # sampling knobs (method="sample")
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  batch_size: int = 64          # sentences per decoding batch
  # Where the search decides between steps (decoding.search_mode): "auto" is
  # one compiled program a batch on an accelerator, host reads on a CPU.
  mode: str = "auto"

  def __post_init__(self):
    """ValueError naming the flag (--<field>) of an impossible setting."""
    def fail(field, reason):
      flag = "decoding" if field == "method" else field
      raise ValueError(f"--{flag}={getattr(self, field)}: {reason}")
    if self.method not in METHODS:
      fail("method", f"not one of {METHODS}")
    if self.beam_size < 1:
      fail("beam_size", "the beam holds at least 1 hypothesis (1 = greedy)")
    if not self.alpha >= 0:
      fail("alpha", "the length penalty exponent is >= 0 (0 = none; the "
           "paper's 0.6)")
    if self.max_extra_len < 1:
      fail("max_extra_len", "outputs may run at least 1 token past the source")
    if self.batch_size < 1:
      fail("batch_size", "a batch holds at least 1 sentence")
    if not self.temperature > 0:
      fail("temperature", "must be > 0 (greedy search is the argmax)")
    if self.top_k < 0:
      fail("top_k", "must be >= 0 (0 disables it)")
    if not 0.0 < self.top_p <= 1.0:
      fail("top_p", "must lie in (0, 1] (1 disables it)")
    if self.mode not in decoding.MODES:
      fail("mode", f"not one of {decoding.MODES}")

  def tag(self) -> str:
    """A short name for file names: beam4_a0.6, greedy, sample_t1.0_k0_p0.9."""
    if self.method == "beam":
      return f"beam{self.beam_size}_a{self.alpha:g}"
    if self.method == "greedy":
      return "greedy"
    return (f"sample_t{self.temperature:g}_k{self.top_k}_p{self.top_p:g}"
            f"_s{self.seed}")


def bucket_length(length: int) -> int:
  """The padded source length used for a batch whose longest row is `length`."""
  for bucket in LENGTH_BUCKETS:
    if length <= bucket:
      return bucket
  return int(math.ceil(length / 128) * 128)


def decode_batch(model_config, params, src: np.ndarray, options: DecodeOptions,
                  batch_index: int):
  """src int32 [rows, length] -> tokens int32 [rows, out_len]."""
  if options.method == "beam":
    return decoding.beam_search(
        model_config, params, src, beam_size=options.beam_size,
        alpha=options.alpha, max_extra_len=options.max_extra_len,
        mode=options.mode).sequences[:, 0]
  if options.method == "greedy":
    return decoding.greedy_search(model_config, params, src,
                                  max_extra_len=options.max_extra_len,
                                  mode=options.mode)
  rng = jax.random.fold_in(jax.random.key(options.seed), batch_index)
  return decoding.sample(model_config, params, src, rng,
                         temperature=options.temperature, top_k=options.top_k,
                         top_p=options.top_p,
                         max_extra_len=options.max_extra_len,
                         mode=options.mode)


def make_batches(sources: Sequence[np.ndarray], batch_size: int,
                 max_len: int) -> list[tuple[list[int], np.ndarray]]:
  """Length-bucketed batches: [(indices into sources, src int32 [rows, len])].

  Sources are sorted by length (longest first) and cut into batches of
  ``batch_size`` rows, each padded to a length bucket, so similar lengths
  share a batch and few shapes get compiled. Every batch has the same number
  of rows (a short last batch gets empty sentences), so few compilations per
  bucket. Every source must fit: ``len <= max_len``.
  """
  order = sorted(range(len(sources)), key=lambda i: -len(sources[i]))
  # A power of two >= 4 (few distinct shapes), at most batch_size.
  rows = min(batch_size, max(4, 1 << max(0, len(sources) - 1).bit_length()))
  batches = []
  for start in range(0, len(order), rows):
    chunk = order[start:start + rows]
    longest = max(len(sources[i]) for i in chunk)
    if longest > max_len:
      raise ValueError(f"a source of {longest} tokens exceeds the model's "
                       f"max_len={max_len}; truncate it first")
    src = np.full((rows, min(bucket_length(longest), max_len)), PAD_ID,
                  np.int32)
    src[len(chunk):, 0] = EOS_ID  # padding rows: an empty sentence
    for row, i in enumerate(chunk):
      src[row, :len(sources[i])] = sources[i]
    batches.append((chunk, src))
  return batches


def decode_ids(model_config: TransformerConfig, params,
               sources: Sequence[np.ndarray], options: DecodeOptions,
               devices: Sequence[jax.Device] | None = None
               ) -> list[list[int]]:
  """Token ids of each source (ending with eos) -> output ids (no eos), in order.

  Decodes in length-bucketed batches (``make_batches``). Every source must
  fit the model (``len <= model_config.max_len``): truncate beforehand.

  devices: with more than one, the params are copied to each and one host
  thread per device takes the next batch (longest first) until none is left.
  A search runs many small ops one after another, which one device cannot
  spread over a CPU's cores; two CPU devices (``jax_num_cpu_devices``) each
  running its own batch keep both cores busy. The outputs do not depend on
  the devices or on which device decoded which batch.
  """
  outputs: list[list[int]] = [[] for _ in sources]
  batches = make_batches(sources, options.batch_size, model_config.max_len)

  def decode(replica, batch_index):
    chunk, src = batches[batch_index]
    tokens = decode_batch(model_config, replica, src, options, batch_index)
    for i, ids in zip(chunk, decoding.strip_special(tokens)):
      outputs[i] = ids

  devices = list(devices or ())
  if len(devices) <= 1:
    # Committed to one device, whatever their origin: jit compiles a program
    # per kind of argument (committed, uncommitted, numpy), and an Orbax
    # restore and an average of checkpoints (numpy) would otherwise each
    # compile every search of every batch shape again.
    replica = jax.device_put(params, devices[0] if devices
                             else jax.local_devices()[0])
    for batch_index in range(len(batches)):
      decode(replica, batch_index)
    return outputs
  todo: queue.SimpleQueue[int] = queue.SimpleQueue()
  for batch_index in range(len(batches)):
    todo.put(batch_index)

  failed = threading.Event()

  def worker(device):
    replica = jax.device_put(params, device)
    while not failed.is_set():
      try:
        batch_index = todo.get_nowait()
      except queue.Empty:
        return
      try:
        decode(replica, batch_index)
      except BaseException:
        failed.set()   # the other threads stop after their current batch
        raise

  # A plain thread pool rather than an SPMD program over a mesh: each batch
  # stops when its own rows end, not in step with the other device's.
  with concurrent.futures.ThreadPoolExecutor(len(devices)) as pool:
    for done in [pool.submit(worker, device) for device in devices]:
      done.result()   # re-raises a worker's error
  return outputs


def truncate(ids: np.ndarray, max_tokens: int) -> np.ndarray:
  """Keeps the first max_tokens - 1 tokens and the final eos."""
  if len(ids) <= max_tokens:
    return ids
  return np.concatenate([ids[:max_tokens - 1], [EOS_ID]]).astype(np.int32)


def encode_sources(tok: tokenizer_lib.Tokenizer, texts: Sequence[str],
                   max_src_tokens: int,
                   on_truncate: Callable[[int, int], None] | None = None
                   ) -> tuple[list[int], list[np.ndarray]]:
  """(indices of the non-empty texts, their token ids with eos).

  Ids longer than max_src_tokens are truncated (eos kept); on_truncate(index,
  num_tokens) is told of each.
  """
  keep = [i for i, text in enumerate(texts) if text.strip()]
  ids = []
  for i, x in zip(keep, tok.encode_batch([texts[i] for i in keep])):
    if len(x) > max_src_tokens:
      if on_truncate is not None:
        on_truncate(i, len(x))
      x = truncate(x, max_src_tokens)
    ids.append(x)
  return keep, ids


def translate_texts(model_config: TransformerConfig, params,
                    tok: tokenizer_lib.Tokenizer, texts: Sequence[str],
                    options: DecodeOptions, max_src_tokens: int | None = None,
                    on_truncate: Callable[[int, int], None] | None = None,
                    devices: Sequence[jax.Device] | None = None
                    ) -> tuple[list[str], list[np.ndarray], list[list[int]]]:
  """Sentences -> (translations, source ids, output ids).

  translations: one per text, same order; an empty text gives "". The id
  lists hold the non-empty texts only (see ``encode_sources``; output ids
  without eos). Sources longer than max_src_tokens (default and cap: the
  model's max_len) are truncated. devices: see ``decode_ids``.
  """
  max_src_tokens = min(max_src_tokens or model_config.max_len,
                       model_config.max_len)
  keep, ids = encode_sources(tok, texts, max_src_tokens, on_truncate)
  outputs = decode_ids(model_config, params, ids, options, devices)
  out = [""] * len(texts)
  for i, hypothesis in zip(keep, tok.decode_batch(outputs)):
    out[i] = hypothesis
  return out, ids, outputs
