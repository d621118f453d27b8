# Sourced by scripts/test.sh and scripts/main.sh: makes (or reuses) a virtual environment with
# torch, numpy, triton and the build tools, then builds and installs this project into it.
# FIMODA_VENV: where the environment lives (default: .venv in the checkout).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FIMODA_VENV:-$ROOT/.venv}"
case "$VENV" in /*) ;; *) VENV="$PWD/$VENV" ;; esac  # the callers cd into the checkout afterwards
# a venv without pip (an interrupted `python3 -m venv`) is made again
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
  python3 -m venv --clear "$VENV"
fi
PY="$VENV/bin/python"
pip_q() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }
# an old setuptools (Python 3.9's venvs bring 58) cannot read pyproject.toml metadata: upgraded once
if ! "$PY" -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 64)" 2>/dev/null; then
  pip_q -U pip setuptools wheel
fi
if ! "$PY" -c "import torch" 2>/dev/null; then
  # 2.13.0 is a local CPU wheel on the development machines; elsewhere take what pip offers.
  pip_q torch==2.13.0 || pip_q torch
fi
pip_q numpy pybind11 cmake ninja
pip_q triton || echo "setup: no triton wheel for this platform; the triton backend stays unavailable" >&2
# The native module is rebuilt only when a source file is newer than it.
SO=$(ls "$ROOT"/fimoda_kernels/_C*.so 2>/dev/null | head -n 1 || true)
# Also rebuilt and reinstalled when the venv cannot import the installed package with its native
# module from outside the checkout (an interrupted install, a module built for another Python).
if [ -z "$SO" ] || [ -n "$(find "$ROOT/csrc" "$ROOT/python/src" "$ROOT/CMakeLists.txt" "$ROOT/setup.py" \
       "$ROOT/pyproject.toml" -newer "$SO" 2>/dev/null | head -n 1)" ] \
   || ! (cd / && "$PY" -c "from fimoda_kernels._ext import _C; assert _C is not None" 2>/dev/null); then
  (cd "$ROOT" && pip_q --no-build-isolation -e ".[test,study]")
else
  pip_q pytest hypothesis scipy scikit-learn matplotlib tqdm
fi
export PATH="$VENV/bin:$PATH"
