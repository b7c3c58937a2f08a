#!/usr/bin/env bash
# Installs everything qinyu-edge needs on a fresh Debian machine (idempotent, quick when done).
# EXTRAS picks the pip extras; torch is pinned to the CPU build that this machine has on disk.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${EXTRAS:-export,quant,audio,bench,dev}"
need=()
for pkg in espeak-ng sox libportaudio2 portaudio19-dev pulseaudio libasound2-plugins; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ] && command -v apt-get >/dev/null; then
  echo "installing Debian packages: ${need[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
pip_q() {  # pip_q install|download ARGS: quiet unless it fails
  local out
  if ! out=$(python3 -m pip "$1" -q --disable-pip-version-check "${@:2}" 2>&1); then
    echo "$out" >&2
    return 1
  fi
}
pip_q install -e ".[${EXTRAS}]" "torch==2.13.0"
# The VAD and Smart Turn models ship inside these wheels; their declared dependencies (torch,
# protobuf and soundfile pins) are not needed to read an ONNX file, so they are left out.
pip_q install --no-deps "silero-vad==6.2.3" "pipecat-ai==1.14.0"
# The frontend tests' oracle is torchaudio's own kaldi fbank and resampler: pure torch source files the
# tests read from the wheel. Downloaded, never installed: its C extension is built for another torch,
# and a broken but importable torchaudio breaks transformers.
if ! compgen -G ".oracles/torchaudio-2.9.1-*.whl" >/dev/null; then
  pip_q download --no-deps --only-binary=:all: "torchaudio==2.9.1" -d .oracles
fi
python3 -c "import qinyu_edge.export, qinyu_edge.runtime, qinyu_edge.engines, qinyu_edge.device" 
