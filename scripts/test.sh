#!/usr/bin/env bash
# Sets up a fresh machine (Debian packages, the Python package, the real Kubernetes peers
# built from the Go module proxy) and runs the whole test suite: unit, integration against
# real sockets and real peers, end-to-end in network namespaces (as root).
# Extra arguments go to pytest, e.g. `scripts/test.sh tests/unit -k state`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
if [ -x tests/peers/build.sh ] && [ "${KUBESHIM_SKIP_PEERS:-0}" != 1 ]; then
  tests/peers/build.sh
fi
exec python3 -m pytest -q -p no:cacheprovider "${@:-tests}"
