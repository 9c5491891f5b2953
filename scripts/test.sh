#!/usr/bin/env bash
# Run the test suite. Tests that start Ray or servers talk only to 127.0.0.1, so when we are root the suite runs
# in a loopback-only network namespace (Ray would otherwise advertise the machine's external address).
# Usage: scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
export MANN_DATA_DIR=${MANN_DATA_DIR:-$(cd .. && pwd)/shared/data/omniglot}
args=$(printf ' %q' "$@")
if [[ $(id -u) == 0 ]] && command -v unshare >/dev/null; then
  exec unshare -n sh -c "ip link set lo up && exec .venv/bin/python -m pytest$args"
fi
exec .venv/bin/python -m pytest "$@"
