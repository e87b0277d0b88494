#!/usr/bin/env bash
# Delete the TPU VM (checkpoints and data stay in the bucket).
source "$(dirname "$0")/common.sh"
parse_flags "$@"
run gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$TPU_ZONE" $(project_flag) --quiet
