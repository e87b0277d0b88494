"""One random-access view over every data source: `{"src": str, "tgt": str}`.

`get_source(data_config, split)` returns a `PairSource` (a Grain
`RandomAccessDataSource`: `len()` and `[i]`) for
- a tfds dataset by name (`bible_es_en`, `wmt14_translate/de-en`,
  `wmt17_translate/de-en`, ...) read with `tfds.data_source` from
  `data_config.data_dir` (local or gs://); the features named by
  `source_lang` / `target_lang` become `src` / `tgt`, which is the direction
  switch (es->en, en->de, de->en). Datasets not yet prepared are built on
  first use (bible_es_en builds in seconds; WMT downloads, so prepare it
  beforehand with `tfds build wmt14_translate/de-en --file_format=array_record`);
- `parallel_text`: the user's files, `data_config.{train,eval}_{src,tgt,tsv}_file`
  (the train files serve `train_split`, the eval files every other split).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import os
import re
from collections.abc import Sequence
from typing import Any

import tensorflow_datasets as tfds
from etils import epath

from train.datasets import bible_es_en  # noqa: F401  (registers the builder)
from train.datasets import parallel_text

PARALLEL_TEXT = "parallel_text"


class PairSource(Sequence):
  """Random access to `{"src": str, "tgt": str}` pairs (Grain data source)."""

  def __init__(self, records: Sequence[Any], src_key: str, tgt_key: str,
               description: str, identity: dict | None = None,
               cache_dir: str = ""):
    self._records = records
    self._src_key = src_key
    self._tgt_key = tgt_key
    self.description = description
    # What the token cache (train/token_cache.py) keys on, and where it keeps
    # ids beside the data ("" = nowhere).
    self.identity = identity or {"description": description}
    self.cache_dir = cache_dir

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict[str, str]:
    record = self._records[index]
    return {"src": _text(record[self._src_key]), "tgt": _text(record[self._tgt_key])}

  def get_many(self, indices) -> list[dict[str, str]]:
    """Pairs at `indices` (a plain loop: tfds's mock data cannot batch-read)."""
    return [self[i] for i in indices]

  def __repr__(self) -> str:
    return f"PairSource({self.description}, {len(self)} pairs)"


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class _ParallelRecords(Sequence):
  def __init__(self, pairs: parallel_text.ParallelText):
    self._pairs = pairs

  def __len__(self):
    return len(self._pairs)

  def __getitem__(self, index):
    return {"src": self._pairs.src[index], "tgt": self._pairs.tgt[index]}


def _parallel_text_source(data_config, split: str) -> PairSource:
  eval_splits = {data_config.eval_split, "validation", "test"}
  if split != data_config.train_split and split not in eval_splits:
    raise ValueError(
        f"parallel_text has the split {data_config.train_split!r} (the train_* "
        f"files) and {sorted(eval_splits)} (the eval_* files), not {split!r}")
  prefix = "train" if split == data_config.train_split else "eval"
  files = {
      k: data_config.get(f"{prefix}_{k}_file") or None
      for k in ("src", "tgt", "tsv")
  }
  pairs = parallel_text.read_parallel_text(
      src_path=files["src"], tgt_path=files["tgt"], tsv_path=files["tsv"]
  )
  where = files["tsv"] or f"{files['src']} | {files['tgt']}"
  paths = [p for p in files.values() if p]
  identity = {"split": prefix, "src": "src", "tgt": "tgt",
              "files": {p: _sha256(p) for p in paths}}
  cache_dir = os.path.join(os.path.dirname(paths[0]), "token_ids")
  return PairSource(_ParallelRecords(pairs), "src", "tgt",
                    f"parallel_text {where}", identity, cache_dir)


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with epath.Path(path).open("rb") as f:
    while chunk := f.read(1 << 22):
      digest.update(chunk)
  return digest.hexdigest()


_WMT = re.compile(r"^wmt(\d\d|_t2t)_translate\b")


def ensure_registered(name: str) -> None:
  """Imports the tfds module defining a WMT builder, e.g. wmt14_translate.

  Without TensorFlow installed, `import tensorflow_datasets` skips registering
  its translate builders (the `tensorflow_datasets.translate` package
  imports TF); the per-year modules themselves import without it.
  """
  match = _WMT.match(name)
  if match:
    importlib.import_module(f"tensorflow_datasets.translate.wmt{match.group(1)}")


@contextlib.contextmanager
def _build_lock(name: str, data_dir: str | None):
  """Serialises first-use builds of a dataset among processes of one machine.

  tfds builds into a temporary directory and renames it into place; a second
  process building the same dataset at the same moment (two trainings started
  together on a fresh machine) fails at that rename with FileExistsError.
  tfds has no lock of its own, so a local data_dir gets an flock here; gs://
  data_dirs are prepared beforehand (experiments/tpu_vm/prepare_wmt.sh).
  """
  root = os.path.expanduser(
      data_dir or os.environ.get("TFDS_DATA_DIR") or tfds.core.constants.DATA_DIR)
  if "://" in root:
    yield
    return
  os.makedirs(root, exist_ok=True)
  with file_lock(os.path.join(root, f".{name.replace('/', '_')}.build.lock")):
    yield


@contextlib.contextmanager
def file_lock(lock_path: str):
  """An exclusive flock on ``lock_path`` (created) while the block runs:
  one process of a machine at a time builds what the others then read."""
  with open(lock_path, "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def _tfds_source(data_config, split: str) -> PairSource:
  ensure_registered(data_config.name)
  with _build_lock(data_config.name, data_config.data_dir or None):
    records = tfds.data_source(
        data_config.name, split=split, data_dir=data_config.data_dir or None
    )
  features = set(records[0].keys()) if len(records) else set()
  for lang in (data_config.source_lang, data_config.target_lang):
    if features and lang not in features:
      raise ValueError(
          f"Dataset {data_config.name!r} has no feature {lang!r} (it has "
          f"{sorted(features)}). Set config.data.source_lang / target_lang "
          "to two of those."
      )
  info = getattr(records, "dataset_info", None)
  identity = {"name": data_config.name, "split": split,
              "version": str(info.version) if info else "",
              # Another build of the same name and version elsewhere (a
              # shared token_cache_dir) is another corpus until shown equal.
              "data_dir": str(info.data_dir) if info else "",
              "size": len(records), "src": data_config.source_lang,
              "tgt": data_config.target_lang}
  return PairSource(
      records, data_config.source_lang, data_config.target_lang,
      f"{data_config.name}[{split}] {data_config.source_lang}->"
      f"{data_config.target_lang}", identity,
      os.path.join(info.data_dir, "token_ids") if info else "",
  )


def get_source(data_config, split: str) -> PairSource:
  """The `{"src", "tgt"}` pairs of one split, for the configured direction."""
  if data_config.name == PARALLEL_TEXT:
    return _parallel_text_source(data_config, split)
  return _tfds_source(data_config, split)
