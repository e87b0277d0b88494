"""python -m train --config=experiments/configs/<name>.py --workdir=<dir>

Any config field can be overridden: --config.num_train_steps=2000
--config.optimizer.learning_rate_scale=2 --config.mesh.data=-1 ...
Rerunning with the same --workdir resumes from its newest checkpoint that
restores (a damaged one is moved to <workdir>/damaged_checkpoints/, never
deleted), or from --checkpoint_step=<step>.

Exit status: 0 done (or stopped by SIGTERM after a checkpoint), 1 a failure
during training (a NaN loss, a checkpoint that cannot be written), 2 a usage
mistake (a bad flag or config value, a workdir of an incompatible config):
one or two lines on stderr, before any training.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (experiments/configs/*.py).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, tokenizer, metrics, config.")
_CHECKPOINT_STEP = flags.DEFINE_integer(
    "checkpoint_step", None, "Resume from this step of the workdir instead of "
    "its newest checkpoint.")
USAGE_EXIT = 2


def _usage_error(message: str):
  print(f"error: {message}\n(python -m train --help for the flags)",
        file=sys.stderr, flush=True)
  sys.exit(USAGE_EXIT)


def parse_flags(argv):
  """absl parsing, with any mistake (a missing config file, a value of the
  wrong type, an unknown field) reported in one line, exit status 2."""
  try:
    rest = flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    # config_flags raises flags.Error, IOError, KeyError or TypeError,
    # depending on what is wrong; its message names the flag and the value.
    text = (str(e).strip() or repr(e)).splitlines()
    _usage_error(" ".join(line.strip() for line in text[:2]))
  if len(rest) > 1:
    _usage_error(f"unexpected arguments {rest[1:]}")
  for name in ("config", "workdir"):
    if flags.FLAGS[name].value is None:
      _usage_error(f"--{name} is required")
  return rest


def main(argv):
  del argv
  # Imported here so --help is fast and jax starts after flag parsing.
  from model import ConfigError  # pylint: disable=g-import-not-at-top
  from train import checkpointing, trainer  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  try:
    trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value,
                               _CHECKPOINT_STEP.value)
  except (ConfigError, checkpointing.IncompatibleCheckpointError,
          checkpointing.CheckpointNotFoundError) as e:
    _usage_error(str(e))
  except (checkpointing.NonFiniteLossError,
          checkpointing.CheckpointWriteError) as e:
    print(f"ERROR: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
