# Shared by the TPU VM scripts: flag parsing and a dry-run-aware runner.
# Every script accepts --dry-run, which prints the commands it would run.
#
# Settings (flags or environment variables):
#   --name / TPU_NAME            TPU VM name                  (default: mt-transformer)
#   --zone / TPU_ZONE            zone                         (default: us-central2-b)
#   --project / GCP_PROJECT      Google Cloud project         (default: gcloud's own)
#   --accelerator / TPU_TYPE     e.g. v4-8 (one host), v4-32 (4 hosts)  (default: v4-8)
#   --runtime / TPU_RUNTIME      TPU VM software version      (default: tpu-ubuntu2204-base)
#   --bucket / GCS_BUCKET        gs:// bucket for data, checkpoints (required where used)
#   --repo / REPO_URL            git URL of this project      (default: this checkout's origin)
#   --config / CONFIG            experiments/configs/<name>.py (default: wmt14_en_de_base.py)
#   --run / RUN_NAME             run name under gs://<bucket>/runs/ (default: the config name)
set -euo pipefail

TPU_NAME="${TPU_NAME:-mt-transformer}"
TPU_ZONE="${TPU_ZONE:-us-central2-b}"
GCP_PROJECT="${GCP_PROJECT:-}"
TPU_TYPE="${TPU_TYPE:-v4-8}"
TPU_RUNTIME="${TPU_RUNTIME:-tpu-ubuntu2204-base}"
GCS_BUCKET="${GCS_BUCKET:-}"
REPO_URL="${REPO_URL:-$(git -C "$(dirname "${BASH_SOURCE[0]}")" remote get-url origin 2>/dev/null || echo "")}"
CONFIG="${CONFIG:-experiments/configs/wmt14_en_de_base.py}"
RUN_NAME="${RUN_NAME:-}"
DRY_RUN=0
EXTRA_ARGS=()

parse_flags() {
  while [ $# -gt 0 ]; do
    case "$1" in
      --dry-run) DRY_RUN=1 ;;
      --name) TPU_NAME="$2"; shift ;;
      --zone) TPU_ZONE="$2"; shift ;;
      --project) GCP_PROJECT="$2"; shift ;;
      --accelerator) TPU_TYPE="$2"; shift ;;
      --runtime) TPU_RUNTIME="$2"; shift ;;
      --bucket) GCS_BUCKET="${2%/}"; shift ;;
      --repo) REPO_URL="$2"; shift ;;
      --config) CONFIG="$2"; shift ;;
      --run) RUN_NAME="$2"; shift ;;
      --) shift; EXTRA_ARGS+=("$@"); break ;;
      -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
      *) echo "unknown flag: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
  done
  RUN_NAME="${RUN_NAME:-$(basename "$CONFIG" .py)}"
}

require_bucket() {
  if [ -z "$GCS_BUCKET" ]; then
    echo "a gs:// bucket is needed: pass --bucket gs://<your-bucket> or set GCS_BUCKET" >&2
    exit 2
  fi
  case "$GCS_BUCKET" in gs://*) ;; *) GCS_BUCKET="gs://$GCS_BUCKET" ;; esac
}

project_flag() { [ -n "$GCP_PROJECT" ] && printf -- '--project=%s' "$GCP_PROJECT" || true; }

# run CMD...: print it; execute it unless --dry-run.
run() {
  local arg shown="+"
  for arg in "$@"; do
    case "$arg" in
      *[[:space:]\'\"\;\&\|\>\<\$]*) shown="$shown '${arg//\'/\'\\\'\'}'" ;;
      *) shown="$shown $arg" ;;
    esac
  done
  echo "$shown"
  if [ "$DRY_RUN" = 0 ]; then "$@"; fi
}

# on_workers WORKERS 'remote command': run a shell command on TPU VM workers
# ("all" for every host of a slice, "0" for the first).
on_workers() {
  local workers="$1" remote="$2"
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$TPU_ZONE" $(project_flag) \
    --worker="$workers" --command="$remote"
}

DATA_DIR() { echo "$GCS_BUCKET/tensorflow_datasets"; }
WORKDIR() { echo "$GCS_BUCKET/runs/$RUN_NAME"; }
