#!/usr/bin/env bash
# Installs everything qinyu-edge needs on a fresh Debian machine (idempotent, quick when done).
# EXTRAS picks the pip extras; torch is pinned to the CPU build that this machine has on disk.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${EXTRAS:-export,dev}"
need=()
for pkg in espeak-ng sox libportaudio2; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ] && command -v apt-get >/dev/null; then
  echo "installing Debian packages: ${need[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
python3 -m pip install -q --disable-pip-version-check -e ".[${EXTRAS}]" "torch==2.13.0" 2>&1 | grep -v "Running pip as the 'root' user" || true
python3 -c "import qinyu_edge.export, qinyu_edge.runtime, qinyu_edge.engines, qinyu_edge.device" 
