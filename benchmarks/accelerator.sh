#!/usr/bin/env bash
# One command for an accelerator host: the loop against its step on
# bible_es_en, train.choose of a short run, base bf16 steps/s and MFU; one JSON.
#
#   bash benchmarks/accelerator.sh [--out FILE] [--quick]
#
# For a host where Python 3.12 has jax (with its GPU/TPU plugin), flax,
# optax, orbax-checkpoint, numpy, sentencepiece and sacrebleu, and nothing can
# be downloaded. Everything else comes in .accel/ (git-ignored), copied there
# beforehand on a machine that has it:
#   .accel/wheels/  the project's other dependencies (../shared/wheels-py312/*.whl),
#                   installed by this script into .accel/site/ (once) with
#                   pip --no-index --no-deps --target, put first on PYTHONPATH;
#                   without wheels the current environment is used as it is;
#   .accel/tfds/    the built tfds folder holding bible_es_en/ (~10 MB), passed
#                   as --config.data.data_dir / --data_dir.
# --out defaults to runs/accelerator.json; --quick is the reduced CPU form the
# tests run. PYTHON picks the interpreter (default python3). Sized for <= 8
# minutes on one H200 (each part has a time limit; see benchmarks/accelerator.py).
set -euo pipefail
cd "$(dirname "$0")/.."
ACCEL=.accel
PY=${PYTHON:-python3}
DATA_DIR=${DATA_DIR:-$ACCEL/tfds}
if [ ! -d "$DATA_DIR/bible_es_en" ]; then
  echo "error: no bible_es_en in $DATA_DIR: build it where the SWORD packages are (bash experiments/quickstart.sh, or python -c 'import train.datasets, tensorflow_datasets as tfds; tfds.data_source(\"bible_es_en\", split=\"test\", data_dir=\"$ACCEL/tfds\")') and copy the folder there" >&2
  exit 2
fi
SITE=""
if compgen -G "$ACCEL/wheels/*.whl" > /dev/null; then
  SITE=$PWD/$ACCEL/site
  STAMP=$SITE/.installed
  WANT=$(ls "$ACCEL"/wheels/*.whl | xargs -n1 basename | sort | sha256sum | cut -c1-16)
  if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    rm -rf "$SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$ACCEL"/wheels/*.whl
    echo "$WANT" > "$STAMP"
  fi
fi
export PYTHONPATH=${SITE:+$SITE:}$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
exec "$PY" -m benchmarks.accelerator --data_dir="$DATA_DIR" "$@"
