#!/usr/bin/env bash
# Installs qinyu-edge's device side on a Jetson into the checkout's .venv: detects the JetPack
# (device/jetson.py), makes the venv from JetPack's own Python with --system-site-packages (so
# JetPack's TensorRT, python3-libnvinfer, imports in it), installs the runtime and audio extras only
# (no torch: export and quantize happen on a workstation), the onnxruntime-gpu build for this JetPack
# from NVIDIA's Jetson AI Lab index, and cuda-python for its CUDA; then runs `qinyu-edge doctor`.
#   --check   detect and print the choices; install nothing.
# PYTHON picks the interpreter (default /usr/bin/python3); QINYU_EDGE_SYSROOT points the detection
# at another root folder (tests); QINYU_EDGE_JETPACK=6|7 installs as for that JetPack when the L4T
# release is one this qinyu-edge does not know.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
base="${PYTHON:-/usr/bin/python3}"
if ! command -v "$base" >/dev/null; then
  echo "error: $base not found; JetPack ships python3 (\`sudo apt install python3\`)" >&2
  exit 2
fi
# The detection needs the standard library only: run it from the source tree, before anything is
# installed, through a package folder that maps qinyu_edge.device onto device/ as pyproject.toml does.
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
mkdir "$src/qinyu_edge"
ln -s "$PWD/qinyu_edge/__init__.py" "$PWD/qinyu_edge/errors.py" "$src/qinyu_edge/"
ln -s "$PWD/device" "$src/qinyu_edge/device"
ver=$(python_minor "$base")
# From inside $src: the checkout's own qinyu_edge/ (no device/ in it) must not shadow it.
choices=$(cd "$src" && PYTHONDONTWRITEBYTECODE=1 "$base" -m qinyu_edge.device.jetson --python "$ver") || exit 2
eval "$choices"
[ "${1:-}" = "--check" ] && exit 0

# shellcheck disable=SC2046,SC2086  # word lists
apt_install libportaudio2 portaudio19-dev $JETSON_APT $(build_tools "$base")
make_venv "$base" --system-site-packages
pip_q install -e ".[audio]"
install_audio_models
if [ -n "$JETSON_ORT_INDEX" ]; then
  # onnxruntime-gpu has the same import name as the CPU onnxruntime that qinyu-edge's requirements pull
  # in: remove that one first (never both), then put the GPU build's files in place again.
  pip_q uninstall -y onnxruntime
  if ! pip_q install --no-deps --force-reinstall --index-url "$JETSON_ORT_INDEX" onnxruntime-gpu; then
    echo "error: no onnxruntime-gpu for JetPack $JETSON_JETPACK at $JETSON_ORT_INDEX (Python $JETSON_PYTHON);" \
         "the CPU build is put back. TensorRT engines (qinyu-edge build, chat --engines) do not need it." >&2
    pip_q install "onnxruntime"
  fi
else
  echo "note: no onnxruntime-gpu is published for JetPack $JETSON_JETPACK; the CPU onnxruntime stays." \
       "TensorRT engines (qinyu-edge build, chat --engines) do not need it." >&2
fi
pip_q install "$JETSON_CUDA_PYTHON"
venv_hint
"$VENV/bin/qinyu-edge" doctor
