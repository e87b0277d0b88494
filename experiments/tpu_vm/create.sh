#!/usr/bin/env bash
# Create a TPU VM: one host (--accelerator v4-8) or a multi-host slice (v4-32, ...).
#   bash experiments/tpu_vm/create.sh --name mt --zone us-central2-b --accelerator v4-32 [--dry-run]
source "$(dirname "$0")/common.sh"
parse_flags "$@"
run gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$TPU_ZONE" $(project_flag) \
  --accelerator-type="$TPU_TYPE" --version="$TPU_RUNTIME"
echo "next: bash experiments/tpu_vm/install.sh --name $TPU_NAME --zone $TPU_ZONE"
