"""What the commands share: their flags, parsing, and usage errors.

``train.evaluate``, ``train.choose``, ``train.translate``, ``train.inspect``
and ``train.export`` define their flags on a private ``FlagValues`` (no clash
between modules), parse with ``parse_flags`` and report a usage mistake with
``UsageError``: one or two lines on stderr naming the flag, the value and
what to do, exit status 2, before any model is loaded.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Sequence

import jax
from absl import flags

from train import checkpointing, inference
from train.translation import METHODS, DecodeOptions

USAGE_EXIT = 2


class UsageError(ValueError):
  """A usage mistake; the message names the flag and what to do."""


def parse_flags(define: Callable[[flags.FlagValues], None],
                argv: Sequence[str], usage: str) -> flags.FlagValues:
  """Parses argv with a private FlagValues that define(fv) fills.

  Prints help and exits 0 on --help; raises UsageError on a bad flag or a
  stray argument.
  """
  fv = flags.FlagValues()
  define(fv)
  if any(a in ("--help", "-h", "--helpfull") for a in argv[1:]):
    print(usage.strip() + "\n\n" + fv.get_help())
    raise SystemExit(0)
  try:
    rest = fv(list(argv))
  except flags.Error as e:
    raise UsageError(f"{e} (see --help)") from None
  if len(rest) > 1:
    raise UsageError(f"unexpected arguments {rest[1:]} (flags are "
                     "--name=value; see --help)")
  return fv


# The persistent compilation cache's size bound (least recently used entries
# go first).
COMPILATION_CACHE_BYTES = 2 << 30


def use_compilation_cache() -> None:
  """Keeps compiled XLA programs on disk for the next command to reuse.

  Each command is a new process that compiles its searches again (one
  program per length bucket and cache length, a few seconds each on a CPU),
  and the quickstart runs six of them on one model. JAX's persistent cache
  turns the repeats into disk reads. Where the user set
  JAX_COMPILATION_CACHE_DIR (or the config) that directory is used;
  otherwise $XDG_CACHE_HOME/flax-transformer-mt/xla (~/.cache/...), bounded
  to COMPILATION_CACHE_BYTES. Programs that compile in under half a second
  are not kept (JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS overrides it).
  FLAX_MT_COMPILATION_CACHE=0 turns the cache off.
  """
  if os.environ.get("FLAX_MT_COMPILATION_CACHE", "1") == "0":
    return
  if not jax.config.jax_compilation_cache_dir:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    jax.config.update("jax_compilation_cache_dir",
                      os.path.join(root, "flax-transformer-mt", "xla"))
    jax.config.update("jax_compilation_cache_max_size",
                      COMPILATION_CACHE_BYTES)
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def run_command(main: Callable[[Sequence[str]], int], argv: Sequence[str]
                ) -> int:
  """main(argv) with a UsageError turned into one line and exit status 2.

  Compiled programs are cached on disk for the next command
  (``use_compilation_cache``); what an abandoned Orbax read or write leaves
  stays quiet (``checkpointing.quiet_abandoned_checkpoint_io``)."""
  checkpointing.quiet_abandoned_checkpoint_io()
  use_compilation_cache()
  try:
    return main(argv)
  except UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    return USAGE_EXIT


def define_model_flags(fv: flags.FlagValues) -> None:
  """--workdir, --checkpoint, --average_last, --ema: which trained model."""
  d = dict(flag_values=fv)
  flags.DEFINE_string("workdir", None, "The training run's directory.", **d)
  flags.DEFINE_string("checkpoint", "latest", "latest (the newest that "
                      "restores), best (by validation) or a step number.", **d)
  flags.DEFINE_integer("average_last", 0, "Average the params of the last N "
                       "checkpoints up to --checkpoint; 0 or 1: no averaging.",
                       **d)
  flags.DEFINE_bool("ema", False, "Use the moving average of the params kept "
                    "by a run with optimizer.ema_decay > 0.", **d)


def define_decode_flags(fv: flags.FlagValues, methods=METHODS) -> None:
  """The search and its knobs (see train.translation.DecodeOptions)."""
  d = dict(flag_values=fv)
  flags.DEFINE_enum("decoding", "beam", list(methods), "Search.", **d)
  flags.DEFINE_integer("beam_size", 4, "Beam width.", **d)
  flags.DEFINE_float("alpha", 0.6, "GNMT length penalty exponent (>= 0).", **d)
  flags.DEFINE_integer("max_extra_len", 50, "Output tokens allowed beyond the "
                       "source length.", **d)
  flags.DEFINE_integer("batch_size", 64, "Sentences per decoding batch.", **d)
  flags.DEFINE_integer(
      "decode_devices", 0, "Devices to spread the batches over, one host "
      "thread each (the same outputs). 0: on a CPU, two host devices if the "
      "process may use two or more cores; on an accelerator, one.", **d)
  if "sample" in methods:
    flags.DEFINE_float("temperature", 1.0, "Sampling temperature (> 0).", **d)
    flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens "
                         "(0: all).", **d)
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1: all).", **d)
    flags.DEFINE_integer("seed", 0, "Sampling seed.", **d)


def decoding_devices(count: int) -> list[jax.Device]:
  """The devices to decode on (--decode_devices): call it before anything
  else touches JAX (Orbax starts the backend when it opens a checkpoint).

  A CPU is one JAX device unless asked otherwise before JAX starts its
  backend: for count 0 (auto) or count > 1 this asks for that many host
  devices (``jax_num_cpu_devices``, which only the CPU backend reads). On
  2 cores two devices decoded greedy 1.5x and beam 1.3x as fast as one,
  where training is faster on one (benchmarks.training --devices=1,2).
  UsageError if count is negative or more than the devices there are.
  """
  if count < 0:
    raise UsageError(f"--decode_devices={count}: use a count >= 1, or 0 for "
                     "the default")
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
      else (os.cpu_count() or 1)
  wanted = count or min(2, cores)
  forced = "xla_force_host_platform_device_count" in os.environ.get(
      "XLA_FLAGS", "")
  if wanted > 1 and not forced:
    try:
      jax.config.update("jax_num_cpu_devices", wanted)
    except RuntimeError:   # the backend has started: its devices stand
      pass
  devices = jax.local_devices()
  if count == 0:   # auto: several devices on a CPU only (not measured elsewhere)
    return devices[:wanted] if jax.default_backend() == "cpu" else devices[:1]
  if count > len(devices):
    raise UsageError(
        f"--decode_devices={count}: this process has {len(devices)} "
        f"{jax.default_backend()} device(s); ask for at most that many")
  return devices[:count]


def model_choice(f: flags.FlagValues) -> tuple[str, str | int, int, bool]:
  """(workdir, checkpoint, average_last, ema), checked before anything loads:
  the arguments of ``inference.load``.

  UsageError when --workdir is missing, is not a trained run's directory,
  has a tokenizer that does not load or is not its checkpoints', holds no
  checkpoint of the asked step, --average_last is negative, or
  --ema asks a run that kept no moving average.
  """
  if not f.workdir:
    raise UsageError("--workdir is required: the directory of a training run")
  try:
    checkpoint = inference.parse_checkpoint(f.checkpoint)
    steps = inference.check_workdir(f.workdir)
    record = inference.check_tokenizer(f.workdir)
  except (ValueError, FileNotFoundError) as e:
    raise UsageError(str(e)) from None
  if isinstance(checkpoint, int) and checkpoint not in steps:
    raise UsageError(f"--checkpoint={checkpoint}: no checkpoint of that step "
                     f"in {f.workdir}; steps: {steps}")
  if f.average_last < 0:
    raise UsageError(f"--average_last={f.average_last}: use a count >= 0")
  if f.ema and not inference.has_ema(record["experiment"]):
    raise UsageError(f"--ema: the run in {f.workdir} kept no moving average of "
                     "its params (optimizer.ema_decay=0); drop --ema, or "
                     "train with --config.optimizer.ema_decay=0.99")
  return f.workdir, checkpoint, f.average_last, f.ema


def decode_options(f: flags.FlagValues) -> DecodeOptions:
  """DecodeOptions from the decode flags; UsageError on an impossible value."""
  sampling = {k: f[k].value for k in ("temperature", "top_k", "top_p", "seed")
              if k in f}
  try:
    return DecodeOptions(method=f.decoding, beam_size=f.beam_size,
                         alpha=f.alpha, max_extra_len=f.max_extra_len,
                         batch_size=f.batch_size, **sampling)
  except ValueError as e:
    raise UsageError(str(e)) from None
