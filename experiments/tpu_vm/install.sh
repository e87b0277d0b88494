#!/usr/bin/env bash
# Install the project on every worker of the TPU VM, with JAX's TPU build.
#   bash experiments/tpu_vm/install.sh --name mt --zone us-central2-b --repo <git url> [--dry-run]
source "$(dirname "$0")/common.sh"
parse_flags "$@"
if [ -z "$REPO_URL" ]; then
  echo "no git URL for the project: pass --repo <url> (or set REPO_URL)" >&2; exit 2
fi
on_workers all "set -e; (test -d mt || git clone $REPO_URL mt); cd mt && git pull --ff-only; \
python3 -m venv .venv && .venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q -e '.[tpu]'; \
.venv/bin/python -c 'import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0].platform)'"
