#!/usr/bin/env bash
# Download and prepare WMT with tensorflow-datasets into gs://<bucket>/tensorflow_datasets,
# as array_record so training needs no TensorFlow. Runs once, on worker 0
# (tfds's WMT download and preparation itself needs TensorFlow: installed there for this step).
#   bash experiments/tpu_vm/prepare_wmt.sh --bucket gs://my-bucket [--dry-run] [-- wmt17_translate/de-en]
source "$(dirname "$0")/common.sh"
parse_flags "$@"
require_bucket
datasets="${EXTRA_ARGS[*]:-wmt14_translate/de-en}"
builds=""
for d in $datasets; do
  builds="$builds && .venv/bin/tfds build $d --data_dir=$(DATA_DIR) --file_format=array_record"
done
on_workers 0 "set -e; cd mt && .venv/bin/pip install -q tensorflow-cpu$builds"
