#!/usr/bin/env bash
# The benchmark entry point: installs what it needs, then runs `python -m bench` as root.
#   bench/run.sh            full run (< 20 min)
#   bench/run.sh --quick    quick run (< 3 min)
# Results: bench/results/<date>-<host>.{md,json,png}. Other flags: python -m bench --help.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
exec $SUDO env "PATH=$PATH" "${PYTHON:-python3}" -m bench "$@"
