"""python -m train --config=experiments/configs/<name>.py --workdir=<dir>

Any config field can be overridden: --config.num_train_steps=2000
--config.optimizer.learning_rate_scale=2 --config.mesh.data=-1 ...
With --config.max_minutes=N the budget is planned first (train/plan.py:
timed steps fix num_train_steps); the trainer then trains to that step count.
Rerunning with the same --workdir resumes from its newest checkpoint that
restores, or from --checkpoint=<step>; newer steps (damaged, or passed
over) are moved to <workdir>/checkpoints_set_aside/, never deleted.

Exit status: 0 done (or stopped by SIGTERM or Ctrl-C after a checkpoint), 1
a failure during training (a NaN loss, a checkpoint that cannot be written),
2 a usage mistake (a bad flag or config value, a workdir of an incompatible
config or tokenizer, one that is read-only or in use by another training
run): one or two lines on stderr, before any training; 130 a second Ctrl-C
(stopped at once, unsaved) or a Ctrl-C before training started.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (experiments/configs/*.py).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, tokenizer, metrics, config.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", "latest", "Resume from: latest (the newest checkpoint that "
    "restores) or a step number of the workdir.")
USAGE_EXIT = 2


def _usage_error(message: str):
  print(f"error: {message}\n(python -m train --help for the flags)",
        file=sys.stderr, flush=True)
  sys.exit(USAGE_EXIT)


def _missing_field(error: BaseException) -> tuple[str, str] | None:
  """(field name, ml_collections' "Did you mean" hint or "") when config_flags
  failed on an unknown field (it wraps a KeyError in an AttributeError)."""
  for e in (error, error.__context__, *error.args):
    if isinstance(e, KeyError) and e.args:
      name, _, hint = str(e.args[0]).partition("\n")
      return name.strip("'\""), hint.strip()
  return None


def parse_flags(argv):
  """absl parsing, with any mistake (a missing config file, a value of the
  wrong type, an unknown field) reported in one line, exit status 2."""
  for arg in argv[1:]:
    if arg.startswith("--config="):
      path = arg.split("=", 1)[1].split(":", 1)[0]  # file.py[:argument]
      if not os.path.isfile(path):
        _usage_error(f"--config={path}: no such file; the configs are in "
                     "experiments/configs/")
  try:
    rest = flags.FLAGS(argv)
    if flags.FLAGS["config"].value is not None:
      _CONFIG.value.get("seed")  # a config that failed to load raises here
  except Exception as e:  # pylint: disable=broad-except
    missing = _missing_field(e)
    if missing:
      name, hint = missing
      given = [a.split("=")[0] for a in argv if a.startswith("--config.")
               and a.split("=")[0].endswith(f".{name}")] or [f"--config.{name}"]
      _usage_error(f"{given[0]}: the config has no field {name!r}"
                   + (f" ({hint})" if hint else "") + "; see the config file "
                   "(and experiments/configs/__init__.py)")
    # config_flags raises flags.Error, IOError, KeyError or TypeError,
    # depending on what is wrong; its message names the flag and the value.
    text = (str(e).strip() or repr(e)).splitlines()
    _usage_error(" ".join(line.strip() for line in text[:2]))
  if len(rest) > 1:
    _usage_error(f"unexpected arguments {rest[1:]}")
  for name in ("config", "workdir"):
    if flags.FLAGS[name].value is None:
      _usage_error(f"--{name} is required")
  if _CHECKPOINT.value != "latest" and not _CHECKPOINT.value.isdigit():
    _usage_error(f"--checkpoint={_CHECKPOINT.value}: use latest or a step "
                 "number")
  return rest


def checkpoint_flag() -> int | None:
  """--checkpoint as a step, or None for the latest."""
  return None if _CHECKPOINT.value == "latest" else int(_CHECKPOINT.value)


def main(argv):
  del argv
  # Imported here so --help is fast and jax starts after flag parsing.
  import tokenizer  # pylint: disable=g-import-not-at-top
  from model import ConfigError  # pylint: disable=g-import-not-at-top
  from train import checkpointing, cli, interrupts, plan, trainer  # pylint: disable=g-import-not-at-top
  checkpointing.quiet_abandoned_checkpoint_io()
  logging.set_verbosity(logging.WARNING)
  cli.use_compilation_cache()  # a resumed run reads its programs back
  try:
    step, start_time = checkpoint_flag(), time.time()
    # A budget (max_minutes) becomes a step count first; the launch's wall
    # time, the planning's included, counts against it.
    config = plan.planned_config(_CONFIG.value, _WORKDIR.value, step,
                                 start_time)
    trainer.train_and_evaluate(config, _WORKDIR.value, step, start_time)
  except (ConfigError, checkpointing.IncompatibleCheckpointError,
          checkpointing.CheckpointNotFoundError,
          tokenizer.TokenizerFileError) as e:
    _usage_error(str(e))
  except KeyboardInterrupt:
    # Ctrl-C outside the training loop (which saves on it): before the first
    # step nothing is lost; after the last, the final save is complete or
    # left as a temporary folder that is never resumed from.
    print(f"Interrupted; nothing saved since the last checkpoint in "
          f"{_WORKDIR.value}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(interrupts.INTERRUPT_EXIT)
  except checkpointing.NonFiniteLossError as e:
    print(f"ERROR: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  except checkpointing.CheckpointWriteError as e:
    print(f"ERROR: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    # Orbax's failed background threads would print more tracebacks during
    # interpreter shutdown; the error is reported and every file is closed.
    os._exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
