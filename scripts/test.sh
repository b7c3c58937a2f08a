#!/usr/bin/env bash
# Set up (see setup.sh) and run the test suite; real-size models are marked slow and left out
# unless QINYU_SLOW=1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/lib.sh
# Tests start `qinyu-edge` and `python` in subprocesses: those must be the venv's too.
export PATH="$VENV/bin:$PATH" VIRTUAL_ENV="$VENV"
marker="not slow and not gpu"
timeout=()
# The whole run is bounded too (it takes 2-4 minutes): a run stuck outside any test, e.g. a worker that
# cannot exit, fails here with a message instead of running into CI's own limit.
run_limit=2400
if [ "${QINYU_SLOW:-0}" = "1" ]; then marker="not gpu"; timeout=(-o timeout=3600); run_limit=14400; fi
export QINYU_EDGE_CACHE="${QINYU_EDGE_CACHE:-$(mktemp -d)/qinyu-edge-cache}"
set +e
timeout --kill-after=60 "$run_limit" "$VENV_PY" -m pytest -n 2 -m "$marker" "${timeout[@]}" "$@"
rc=$?
[ $rc -eq 124 ] && echo "the test run did not finish within $run_limit s; see the last test named above" >&2
set -e
# pytest exits 5 when nothing was collected: that is a failure for us, not a pass.
exit $rc
