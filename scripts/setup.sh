#!/usr/bin/env bash
# Installs everything qinyu-edge needs on a fresh Debian machine into the checkout's virtual environment
# .venv (idempotent, quick when done). The venv is made from $PYTHON (default: the python3 first on
# PATH) on the first run and reused after. EXTRAS picks the pip extras; torch is pinned to the CPU
# build that this machine has on disk. A Jetson uses scripts/setup-jetson.sh instead.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
EXTRAS="${EXTRAS:-export,quant,audio,bench,dev}"
base="${PYTHON:-python3}"
# shellcheck disable=SC2046  # build_tools prints a word list
apt_install espeak-ng sox libportaudio2 portaudio19-dev pulseaudio libasound2-plugins $(build_tools "$base")
make_venv "$base"
pip_q install -e ".[${EXTRAS}]" "torch==2.13.0"
install_audio_models
# The frontend tests' oracle is torchaudio's own kaldi fbank and resampler: pure torch source files the
# tests read from the wheel. Downloaded, never installed: its C extension is built for another torch,
# and a broken but importable torchaudio breaks transformers.
if ! compgen -G ".oracles/torchaudio-2.9.1-*.whl" >/dev/null; then
  pip_q download --no-deps --only-binary=:all: "torchaudio==2.9.1" -d .oracles
fi
"$VENV_PY" -c "import qinyu_edge.export, qinyu_edge.runtime, qinyu_edge.engines, qinyu_edge.device"
venv_hint
