#!/usr/bin/env bash
# The main job on a fresh machine: install (once) and run the quickstart search (TPE + freeze_thaw under a 240k-episode
# cap, about 2 min on 2 CPUs).
# Omniglot is read from MANN_DATA_DIR (default: ../shared/data/omniglot beside this repository).
# Usage: scripts/quickstart.sh [--set key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -x .venv/bin/mann-search ]] || bash scripts/install.sh
export MANN_DATA_DIR=${MANN_DATA_DIR:-$(cd .. && pwd)/shared/data/omniglot}
cmd=(.venv/bin/mann-search run configs/search/quickstart.yaml "$@")
# With nothing remote to reach, a root user runs it in a loopback-only network namespace, so Ray binds to
# 127.0.0.1 only (Ray otherwise advertises the machine's external address).
if [[ $(id -u) == 0 && -z "${RAY_ADDRESS:-}" && -z "${MLFLOW_TRACKING_URI:-}" ]] && command -v unshare >/dev/null; then
  exec unshare -n sh -c "ip link set lo up && exec $(printf '%q ' "${cmd[@]}")"
fi
exec "${cmd[@]}"
