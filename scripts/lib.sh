# Shared by setup.sh, setup-jetson.sh, demo.sh and test.sh (sourced, from the checkout's root):
# Debian packages, the checkout's virtual environment .venv, and quiet pip inside it.
#
# Everything installs into .venv: Debian 12 and Ubuntu 23.04+ mark their own python3 "externally
# managed", so pip refuses to install into it (PEP 668), and a Jetson's system Python belongs to JetPack.

VENV="$PWD/.venv"
VENV_PY="$VENV/bin/python"

as_root() {  # as_root CMD...: run CMD as root (through sudo when we are not)
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_install() {  # apt_install PKG...: installs those of the Debian packages that are missing
  local need=() pkg
  for pkg in "$@"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
  done
  [ ${#need[@]} -eq 0 ] && return 0
  if ! command -v apt-get >/dev/null; then
    echo "warning: not a Debian system; install these yourself if anything below fails: ${need[*]}" >&2
    return 0
  fi
  echo "installing Debian packages: ${need[*]}"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${need[@]}" >/dev/null
}

python_minor() {  # python_minor PY: "3.11"
  "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])'
}

make_venv() {  # make_venv BASE_PYTHON [--system-site-packages]: creates .venv, or reuses a working one
  local base="$1" system_site="${2:-}" ver
  if ! command -v "$base" >/dev/null; then
    echo "error: $base not found; install Python 3.10 or newer (\`apt-get install python3\`)" >&2
    return 2
  fi
  if [ -x "$VENV_PY" ] && "$VENV_PY" -m pip --version >/dev/null 2>&1; then
    # JetPack's TensorRT is visible only from a venv that sees the system site-packages.
    if [ -z "$system_site" ] || grep -q "include-system-site-packages = true" "$VENV/pyvenv.cfg"; then
      return 0
    fi
    echo "recreating $VENV with --system-site-packages (JetPack's TensorRT must be importable in it)"
  fi
  ver=$(python_minor "$base")
  if ! "$base" -c "import ensurepip, venv" >/dev/null 2>&1; then
    apt_install "python${ver}-venv"  # Debian splits venv's ensurepip off the interpreter
  fi
  echo "creating the virtual environment $VENV (Python $ver from $(command -v "$base"))"
  # --clear: a venv left half-made by an interrupted run is replaced, not reused.
  "$base" -m venv --clear $system_site "$VENV"
}

pip_q() {  # pip_q install|download|uninstall ARGS: pip of .venv, quiet unless it fails
  local out
  if ! out=$("$VENV_PY" -m pip "$1" -q --disable-pip-version-check "${@:2}" 2>&1); then
    echo "$out" >&2
    return 1
  fi
}

install_audio_models() {
  # The VAD and Smart Turn models ship inside these wheels; their declared dependencies (torch,
  # protobuf and soundfile pins) are not needed to read an ONNX file, so they are left out.
  pip_q install --no-deps "silero-vad==6.2.3" "pipecat-ai==1.14.0"
}

build_tools() {  # build_tools BASE_PYTHON: what pip needs to build PyAudio (no Linux wheel) for it
  local include
  include=$("$1" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
  if [ ! -f "$include/Python.h" ]; then echo "gcc python$(python_minor "$1")-dev"; else echo "gcc"; fi
}

venv_hint() {
  echo "qinyu-edge is installed in $VENV: enter it with \`source .venv/bin/activate\` (then \`qinyu-edge --help\`), or run .venv/bin/qinyu-edge directly."
}
