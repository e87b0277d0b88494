#!/usr/bin/env bash
# Train on every worker of the TPU VM: each host runs the same command; JAX's
# distributed runtime finds its peers on a TPU VM slice by itself.
# The mesh puts all devices on the data axis unless overridden after --, e.g.
#   bash experiments/tpu_vm/launch.sh --bucket gs://b --config experiments/configs/wmt14_en_de_big.py \
#        -- --config.mesh.data=-1 --config.mesh.fsdp=4
source "$(dirname "$0")/common.sh"
parse_flags "$@"
require_bucket
overrides="${EXTRA_ARGS[*]:-}"
on_workers all "cd mt && nohup .venv/bin/python -m train --config=$CONFIG --workdir=$(WORKDIR) \
--config.data.data_dir=$(DATA_DIR) --config.distributed.enabled=True $overrides \
> train.log 2>&1 &"
echo "follow: gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$TPU_ZONE --worker=0 --command='tail -f mt/train.log'"
echo "TensorBoard: tensorboard --logdir $(WORKDIR)"
