#!/usr/bin/env bash
# Set up (see setup.sh) and run the test suite; real-size models are marked slow and left out
# unless QINYU_SLOW=1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
marker="not slow and not gpu"
timeout=()
if [ "${QINYU_SLOW:-0}" = "1" ]; then marker="not gpu"; timeout=(-o timeout=3600); fi
export QINYU_EDGE_CACHE="${QINYU_EDGE_CACHE:-$(mktemp -d)/qinyu-edge-cache}"
set +e
python3 -m pytest -n 2 -m "$marker" "${timeout[@]}" "$@"
rc=$?
set -e
# pytest exits 5 when nothing was collected: that is a failure for us, not a pass.
exit $rc
