#!/usr/bin/env bash
# Set up this checkout from nothing: a virtual environment in .venv with the
# project installed (pip install -e ".[dev]"), and the Debian packages of the
# offline Spanish-English corpus. Safe to run again: it only does what is missing.
#   VENV=<dir>   use another virtual environment location (default: .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

# 1. The corpus: SWORD modules RV1909 (es), WEB and KJV (en), public domain.
corpus_pkgs="sword-text-sparv sword-text-web sword-text-kjv"
missing=""
for module in spaRV1909eb engWEB2015eb engKJV2006eb; do
  [ -d "/usr/share/sword/modules/texts/ztext/$module" ] || missing="$missing $module"
done
if [ -n "$missing" ]; then
  echo "[setup] corpus modules missing:$missing; installing $corpus_pkgs"
  if [ "$(id -u)" = 0 ]; then sudo=""; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo="sudo"; else
    echo "[setup] cannot install system packages (not root, no passwordless sudo)." >&2
    echo "[setup] run:  sudo apt-get update && sudo apt-get install -y $corpus_pkgs" >&2
    exit 1
  fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq $corpus_pkgs
fi

# 2. The Python environment.
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing the project and its dependencies into $VENV (a few minutes the first time)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e ".[dev]"
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi
echo "[setup] ready: $VENV/bin/python"
