"""One workdir, one writer: what ``train`` checks and holds before any work.

    lock = claim(workdir, tokenizer=True)   # WorkdirError (a ConfigError) if not
    ...                                     # train
    lock.release()                          # also on exit, or when the process dies

``claim`` creates the workdir, refuses one that cannot be written, takes the
workdir's lock and refuses a workdir whose checkpoints have lost their
tokenizer, each in one line naming the path and what to do.

The lock: ``fcntl.flock`` on ``<workdir>/train.lock``, which names its holder
(host, pid, since when). The kernel drops a flock when its process ends, by
kill -9 too, so a killed run never blocks its resume; the file a killed run
leaves behind only names a holder that is gone. Evaluation, translation and
export only read a workdir and take no lock: they run beside a training.
Written here rather than taken from a library: the filelock packages either
leave a stale file that blocks (soft locks) or do not say who holds the lock.
Local workdirs only; a gs:// workdir (multi-host runs) has no flock, and
only process 0 of a multi-host run takes the lock.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket

from etils import epath

import tokenizer as tokenizer_lib
from model import ConfigError
from train import checkpointing

LOCK_FILE = "train.lock"
# The locks this process holds, by workdir: a budget's plan and the training
# it plans claim the same workdir in one process (a second flock on another
# descriptor of the same file would refuse the process itself).
_held: dict[str, "Lock"] = {}


class WorkdirError(ConfigError):
  """The workdir cannot be trained in (busy, read-only, incomplete)."""


class Lock:
  """The held lock of a workdir (``release`` is idempotent); None-like for
  workdirs without one (remote file systems, processes other than 0)."""

  def __init__(self, path: str | None = None, fd: int | None = None):
    self.path, self._fd = path, fd
    if fd is not None:
      atexit.register(self.release)

  @contextlib.contextmanager
  def released_on_error(self):
    """Releases the lock if the block raises (a refusal after the claim)."""
    try:
      yield
    except BaseException:
      self.release()
      raise

  def release(self) -> None:
    if self._fd is None:
      return
    fd, self._fd = self._fd, None
    atexit.unregister(self.release)
    _held.pop(os.path.dirname(self.path), None)
    try:
      os.unlink(self.path)   # while still held: no one else's file
    except OSError:
      pass
    os.close(fd)   # drops the flock


def _holder(path: str) -> str:
  """'host H, pid P, since T' from a lock file, or what is known."""
  try:
    with open(path, encoding="utf-8") as f:
      info = json.loads(f.read() or "{}")
    return (f"host {info['host']}, pid {info['pid']}, since "
            f"{info['since']}")
  except (OSError, ValueError, KeyError, TypeError):
    return "a process that has not written its name yet"


def _lock(workdir: str) -> Lock:
  """Takes <workdir>/train.lock; WorkdirError naming the holder if taken."""
  path = os.path.join(workdir, LOCK_FILE)
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno not in (errno.EAGAIN, errno.EACCES):
        raise
      raise WorkdirError(
          f"--workdir={workdir} is in use by another training run ("
          f"{_holder(path)}; {path}): wait for it to end or stop it, or use "
          "another --workdir") from None
    try:
      same = os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:   # its holder released it meanwhile
      same = False
    if same:
      break
    os.close(fd)
  since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
  info = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                     "since": since})
  os.ftruncate(fd, 0)
  os.pwrite(fd, (info + "\n").encode(), 0)
  return Lock(path, fd)


def _check_writable(workdir: epath.Path) -> None:
  """WorkdirError if the workdir, or a file or folder train writes in it, is
  read-only (checked before any work)."""
  for name in ("", checkpointing.CHECKPOINT_DIR, "tokenizer",
               "tensorboard", "metrics.jsonl", "config.json"):
    path = workdir / name if name else workdir
    if path.exists() and not os.access(path, os.W_OK):
      raise WorkdirError(
          f"--workdir={workdir}: {path} is read-only; training writes there "
          "(make it writable, or pass another --workdir; evaluate and "
          "translate can read it as it is)")


def _check_tokenizer(workdir: epath.Path) -> None:
  """WorkdirError if the workdir has checkpoints but lost their tokenizer."""
  steps = checkpointing.complete_steps(checkpointing.checkpoint_dir(workdir))
  path = tokenizer_lib.model_path(workdir)
  if steps and not path.exists():
    raise WorkdirError(
        f"--workdir={workdir} holds checkpoints (steps {steps}) but not the "
        f"tokenizer they were trained with ({path} is missing): put it back "
        "(a new one would not match their ids), or use a new --workdir")


def check_steps_left(step: int, num_train_steps: int, directory) -> None:
  """WorkdirError if the run resumed at ``step`` is already past
  ``num_train_steps`` (before config.json or anything else is written)."""
  if step > num_train_steps:
    raise WorkdirError(
        f"--config.num_train_steps={num_train_steps}: the run in {directory} "
        f"is already at step {step}; nothing was changed. Pass a larger "
        "num_train_steps to train on, --checkpoint=<step> to go back to an "
        "earlier checkpoint, or a new --workdir")


def claim(workdir, tokenizer: bool = True, main: bool = True) -> Lock:
  """Creates the workdir and takes it for training (see the module doc).

  tokenizer: whether the run reads a tokenizer (not with synthetic data);
  main: whether this is process 0 (the only one that locks and checks).
  """
  path = epath.Path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f"--workdir={workdir}: cannot create it "
                       f"({e.strerror}); pass a directory you can write"
                       ) from None
  if not main or "://" in str(workdir):
    return Lock()
  if os.fspath(path) in _held:
    return _held[os.fspath(path)]
  _check_writable(path)
  try:
    lock = _lock(os.fspath(path))
  except OSError as e:   # a mode or a mount the access check missed
    if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
      raise
    raise WorkdirError(f"--workdir={workdir}: cannot write it ({e.strerror})"
                       "; pass a directory you can write") from None
  with lock.released_on_error():
    if tokenizer:
      _check_tokenizer(path)
  _held[os.fspath(path)] = lock
  return lock
