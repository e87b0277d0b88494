"""Shared fixtures.

--- data / tokenizer fixtures (owned by the input-pipeline tests) ---
`bible_data_dir`: a tfds data_dir holding `bible_es_en`, built once per test
run and shared by pytest-xdist workers (file lock), or $BIBLE_TFDS_DATA_DIR if
it already holds a built copy. `bible_config`: `config.data` pointing at it.
`bible_tokenizer`: the default 8k unigram SentencePiece model trained on the
Bible train split, also built once per run.
"""

import atexit
import contextlib
import fcntl
import os
import shutil
import tempfile

# The commands keep compiled programs in a persistent cache under ~/.cache
# (train/cli.py); tests that run them do not write there, except the one
# that checks the cache (test_translate.py), in a directory of its own.
os.environ.setdefault("FLAX_MT_COMPILATION_CACHE", "0")
# One JAX compilation cache for the whole test run instead: the pytest
# processes (xdist workers inherit it) and every child process they start.
# The child processes train and decode the same tiny programs again and
# again, and compiling is most of their time: a 20-step `tiny` training run
# took 23 s from an empty cache, 14.5 s reading its programs back. Made by
# the first process of the run, removed when it exits.
if "FLAX_MT_TEST_XLA_CACHE" not in os.environ:
  os.environ["FLAX_MT_TEST_XLA_CACHE"] = tempfile.mkdtemp(
      prefix="flax-mt-tests-xla-")
  atexit.register(shutil.rmtree, os.environ["FLAX_MT_TEST_XLA_CACHE"],
                  ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["FLAX_MT_TEST_XLA_CACHE"]
# Keep every program, however quickly it compiles (JAX's default keeps only
# those over a second: most of the tiny test programs).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# Compiling, not running, is most of the suite's time on a 2-core CPU. These
# XLA flags cut it by ~30% (three in-process decoding and training tests:
# 105 -> 73 s) and hold for this process, its xdist workers and every child
# process; the runs a test compares share them. A test that needs more
# devices appends its --xla_force_host_platform_device_count to them.
FAST_COMPILE = ("--xla_backend_optimization_level=0 "
                "--xla_llvm_disable_expensive_passes=true")
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = " ".join(
      filter(None, [os.environ.get("XLA_FLAGS", ""), FAST_COMPILE]))

import pytest  # noqa: E402
from experiments import configs  # noqa: E402

# The commands ask JAX for two CPU devices to decode on when its backend has
# not started yet (train/cli.py: decoding_devices). Started here, with the
# one device every in-process test expects; the tests of several devices run
# child processes.
import jax  # noqa: E402
jax.devices()


@contextlib.contextmanager
def _shared_build(tmp_path_factory, name):
  """A directory shared by all xdist workers of this run, built under a lock."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # Common to every worker of this run.
  path = root / name
  with open(root / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield path
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def bible_data_dir(tmp_path_factory):
  import tensorflow_datasets as tfds
  import train.datasets  # noqa: F401

  given = os.environ.get("BIBLE_TFDS_DATA_DIR")
  if given:
    return given
  with _shared_build(tmp_path_factory, "tfds_data") as path:
    tfds.builder("bible_es_en", data_dir=str(path)).download_and_prepare()
  return str(path)


@pytest.fixture(scope="session")
def bible_config(bible_data_dir):
  config = configs.data_config()
  config.data_dir = bible_data_dir
  return config


@pytest.fixture(scope="session")
def bible_tokenizer(bible_config, tmp_path_factory):
  from train import input_pipeline

  with _shared_build(tmp_path_factory, "bible_workdir") as workdir:
    return input_pipeline.train_or_load_tokenizer(bible_config, str(workdir))
