#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv: torch 2.13.0 first (the CPU build that pip
# finds locally; a bare `torch` would pull a multi-GB CUDA build), then the project with its test extra.
# Usage: scripts/install.sh [--fresh]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [[ "${1:-}" == "--fresh" || ! -x .venv/bin/python ]]; then
  "$PY" -m venv --clear .venv
fi
# pip, quiet: its errors and warnings still show, except "WARNING: Location 'file:///...' is ignored", which a
# local file:// index (extra-index-url in this machine's pip config) prints for every project it does not hold.
pip() {
  { .venv/bin/python -m pip "$@" 2>&1 1>&3 3>&- | sed -u "/^WARNING: Location 'file:[^']*' is ignored: /d" >&2; } 3>&1
}
pip install -q --upgrade pip
pip install -q "torch==2.13.0"
pip install -q -e ".[dev]"
# Build the C++ time loops of the fused MANN now (about a minute, cached), not inside the first training run.
.venv/bin/python -c "from mann.fused import extension; print('C++ time loops:', 'built' if extension() else 'unavailable (Python loops)')"
.venv/bin/python -c "import torch, ray, optuna, mlflow, mann, search; print(f'installed: torch {torch.__version__}, ray {ray.__version__}, optuna {optuna.__version__}, mlflow {mlflow.__version__}')"
