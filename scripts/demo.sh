#!/usr/bin/env bash
# Set up (see setup.sh) and run the embedded default demo on the tiny preset.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/lib.sh
exec "$VENV/bin/qinyu-edge" demo "$@"
