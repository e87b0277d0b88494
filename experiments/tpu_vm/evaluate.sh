#!/usr/bin/env bash
# Score the run's checkpoints on the test split (beam 4, alpha 0.6, averaging the
# last checkpoints as the paper does), on worker 0.
#   bash experiments/tpu_vm/evaluate.sh --bucket gs://b --config experiments/configs/wmt14_en_de_base.py [--dry-run] [-- --average_last=5]
source "$(dirname "$0")/common.sh"
parse_flags "$@"
require_bucket
extra="${EXTRA_ARGS[*]:-}"
on_workers 0 "cd mt && .venv/bin/python -m train.evaluate --workdir=$(WORKDIR) --split=test $extra"
