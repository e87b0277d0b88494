"""Tokenize a split once; keep its ids as flat arrays beside the data.

    ids = token_cache.load_or_build(data_config, tok, "train")
    ids.src_ids[ids.src_offsets[i]:ids.src_offsets[i + 1]]   # pair i's source ids
    ids.src_lengths(), ids.tgt_lengths()                      # int64 [num_pairs]

The ids are the tokenizer's full encodings (eos included, never truncated):
`max_len` and `long_pairs` are applied when packing, so one cache serves
every max_len (the way fairseq's binarized data and seqio's cache keep ids).

Where: `<cache dir>/<split>.<src>-<tgt>.<key>.npz`, the cache dir being
`data_config.token_cache_dir`, or else beside the data: a tfds dataset's
version directory (`<data_dir>/<name>/<version>/token_ids/`) or the
parallel_text files' directory (`<dir>/token_ids/`). The key is 16 hex
digits of the sha256 of {tokenizer fingerprint, source identity} (tfds:
name, version, split, size, features; parallel_text: the files' sha256),
so a changed tokenizer or changed data can never be served stale ids.

Building: the strings are read in this process and encoded by
`tokenize_workers` processes (0 = every core this process may use).
Processes, not SentencePiece's own `num_threads`: measured on 2 cores, its
threads gave 1.35-1.45x (turning the result lists into arrays stays serial
under the GIL), two processes that each return flat arrays 1.9x. The file is
written atomically (temporary name + rename); on a local disk an flock lets
one process of the machine build while the others wait, and on a remote
one (gs://) process 0 builds while the others wait for the file, as the
tokenizer does (tokenizer/training.py).
"""

from __future__ import annotations

import concurrent.futures
import errno
import dataclasses
import hashlib
import io
import itertools
import json
import logging
import multiprocessing
import os
import time

import numpy as np
from etils import epath

from model import ConfigError
from train.datasets import sources

class TokenCacheError(ConfigError):
  """The token cache's folder cannot be written (a usage error: exit 2)."""


FORMAT = 1  # bump when the file layout changes
CHUNK = 8192  # sentences per worker task
MIN_PARALLEL = 4 * CHUNK  # smaller splits are encoded in this process


@dataclasses.dataclass
class TokenizedSplit:
  """A split's ids: pair i's source ids are src_ids[src_offsets[i]:src_offsets[i+1]].

  src_ids, tgt_ids: int32 [total tokens]; src_offsets, tgt_offsets: int64
  [num_pairs + 1], starting at 0.
  """

  src_ids: np.ndarray
  src_offsets: np.ndarray
  tgt_ids: np.ndarray
  tgt_offsets: np.ndarray

  def __len__(self) -> int:
    return len(self.src_offsets) - 1

  def src_lengths(self) -> np.ndarray:
    return np.diff(self.src_offsets)

  def tgt_lengths(self) -> np.ndarray:
    return np.diff(self.tgt_offsets)

  def pair(self, i: int) -> tuple[np.ndarray, np.ndarray]:
    return (self.src_ids[self.src_offsets[i]:self.src_offsets[i + 1]],
            self.tgt_ids[self.tgt_offsets[i]:self.tgt_offsets[i + 1]])


# --- encoding (in worker processes) ---------------------------------------------

_worker_sp = None


def _init_worker(model_proto: bytes) -> None:
  global _worker_sp  # pylint: disable=global-statement
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel
  _worker_sp = spm.SentencePieceProcessor(model_proto=model_proto)


def _encode_chunk(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
  """Strings -> (flat int32 ids, int64 lengths), each sequence ending with eos."""
  out = _worker_sp.encode(texts, out_type=int, add_eos=True, num_threads=1)
  lengths = np.fromiter(map(len, out), np.int64, len(out))
  flat = np.fromiter(itertools.chain.from_iterable(out), np.int32,
                     int(lengths.sum()))
  return flat, lengths


def default_workers() -> int:
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def encode_texts(model_proto: bytes, texts: list[str], workers: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Strings -> (flat int32 ids, int64 offsets [len(texts) + 1]).

  `workers` processes (0 = every usable core); one worker, or a text list
  under MIN_PARALLEL, encodes in this process.
  """
  workers = workers or default_workers()
  chunks = [texts[i:i + CHUNK] for i in range(0, len(texts), CHUNK)]
  if workers == 1 or len(texts) < MIN_PARALLEL:
    _init_worker(model_proto)
    parts = [_encode_chunk(c) for c in chunks]
  else:
    # spawn, not fork: this process runs JAX's threads, which fork can deadlock.
    with concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker, initargs=(model_proto,)) as pool:
      parts = list(pool.map(_encode_chunk, chunks))
  flat = np.concatenate([p[0] for p in parts] or [np.zeros(0, np.int32)])
  offsets = np.zeros(len(texts) + 1, np.int64)
  if parts:
    np.cumsum(np.concatenate([p[1] for p in parts]), out=offsets[1:])
  return flat, offsets


def tokenize_source(source, model_proto: bytes, workers: int = 0
                    ) -> TokenizedSplit:
  """Every pair of a PairSource -> TokenizedSplit."""
  pairs = source.get_many(range(len(source)))
  # Both sides in one call: one pool of worker processes, started once.
  ids, offsets = encode_texts(
      model_proto, [p["src"] for p in pairs] + [p["tgt"] for p in pairs],
      workers)
  n, middle = len(pairs), offsets[len(pairs)]
  return TokenizedSplit(ids[:middle], offsets[:n + 1], ids[middle:],
                        offsets[n:] - middle)


# --- the cache file -----------------------------------------------------------------


def cache_key(tokenizer_fingerprint: str, source_identity: dict) -> str:
  """16 hex digits naming the ids of `source_identity` under that tokenizer."""
  blob = json.dumps({"format": FORMAT, "tokenizer": tokenizer_fingerprint,
                     "source": source_identity}, sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_path(data_config, tok, source) -> epath.Path | None:
  """Where the ids of `source` under `tok` live; None if nowhere to keep them."""
  root = data_config.get("token_cache_dir", "") or source.cache_dir
  if not root:
    return None
  ident = source.identity
  name = (f"{ident.get('split', 'split')}.{ident.get('src', 'src')}-"
          f"{ident.get('tgt', 'tgt')}.{cache_key(tok.fingerprint, ident)}.npz")
  return epath.Path(root) / name.replace("/", "_")


def save(split: TokenizedSplit, path: epath.Path) -> None:
  """Writes `path` atomically: a temporary file in the same folder, renamed."""
  path.parent.mkdir(parents=True, exist_ok=True)
  buffer = io.BytesIO()
  np.savez(buffer, **dataclasses.asdict(split))
  tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
  tmp.write_bytes(buffer.getvalue())
  tmp.rename(path)


def load(path: epath.Path) -> TokenizedSplit:
  with np.load(io.BytesIO(path.read_bytes())) as f:
    return TokenizedSplit(**{k: f[k] for k in
                             ("src_ids", "src_offsets", "tgt_ids", "tgt_offsets")})


def load_or_build(data_config, tok, source, *, is_writer: bool | None = None,
                  wait_timeout_s: float = 3600.0) -> TokenizedSplit:
  """The ids of every pair of `source` (a PairSource), from the cache if there.

  `is_writer`: whether this process builds a missing cache on a remote
  filesystem (default: jax.process_index() == 0); the others wait for it.
  """
  workers = data_config.get("tokenize_workers", 0)
  path = cache_path(data_config, tok, source)
  if path is None:
    return tokenize_source(source, tok.model_proto, workers)
  if path.exists():
    return load(path)
  remote = "://" in str(path)
  if remote:
    if is_writer is None:
      import jax  # pylint: disable=import-outside-toplevel
      is_writer = jax.process_index() == 0
    if not is_writer:
      return _wait_and_load(path, wait_timeout_s)
    return _build(source, tok, workers, path)
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    with sources.file_lock(f"{path}.lock"):
      if path.exists():  # another process built it while we waited
        return load(path)
      return _build(source, tok, workers, path)
  except OSError as e:
    if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
      raise
    raise TokenCacheError(
        f"cannot write the token cache {path} ({e.strerror}): set "
        "--config.data.token_cache_dir to a writable folder") from e


def _build(source, tok, workers: int, path: epath.Path) -> TokenizedSplit:
  start = time.perf_counter()
  split = tokenize_source(source, tok.model_proto, workers)
  save(split, path)
  logging.info("Tokenized %s (%d pairs, %d + %d tokens) in %.1fs -> %s",
               source.description, len(split), len(split.src_ids),
               len(split.tgt_ids), time.perf_counter() - start, path)
  return split


def _wait_and_load(path: epath.Path, timeout_s: float) -> TokenizedSplit:
  deadline = time.monotonic() + timeout_s
  while not path.exists():
    if time.monotonic() > deadline:
      raise TimeoutError(
          f"Waited {timeout_s:.0f}s for process 0 to write the token cache "
          f"{path}; check process 0's log.")
    time.sleep(2.0)
  return load(path)
