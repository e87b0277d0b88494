"""python -m train --config=experiments/configs/<name>.py --workdir=<dir>

Any config field can be overridden: --config.num_train_steps=2000
--config.optimizer.learning_rate_scale=2 --config.mesh.data=-1 ...
Rerunning with the same --workdir resumes from its latest checkpoint.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (experiments/configs/*.py).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, tokenizer, metrics, config.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Imported here so --help is fast and jax starts after flag parsing.
  from train import checkpointing, trainer  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  try:
    trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (checkpointing.NonFiniteLossError,
          checkpointing.IncompatibleCheckpointError) as e:
    print(f"ERROR: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
