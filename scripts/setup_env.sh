# Sourced by scripts/test.sh and scripts/main.sh: makes (or reuses) a virtual environment with
# torch, numpy, triton and the build tools, then builds and installs this project into it.
# FIMODA_VENV: where the environment lives (default: .venv in the checkout).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FIMODA_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
pip_q() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }
if ! "$PY" -c "import torch" 2>/dev/null; then
  # 2.13.0 is a local CPU wheel on the development machines; elsewhere take what pip offers.
  pip_q torch==2.13.0 || pip_q torch
fi
pip_q numpy triton pybind11 cmake ninja setuptools wheel
# The native module is rebuilt only when a source file is newer than it.
SO=$(ls "$ROOT"/fimoda_kernels/_C*.so 2>/dev/null | head -n 1 || true)
if [ -z "$SO" ] || [ -n "$(find "$ROOT/csrc" "$ROOT/python/src" "$ROOT/CMakeLists.txt" "$ROOT/setup.py" -newer "$SO" 2>/dev/null | head -n 1)" ] \
   || ! "$PY" -c "import fimoda_kernels" 2>/dev/null; then
  (cd "$ROOT" && pip_q --no-build-isolation -e ".[test,study]")
else
  pip_q pytest hypothesis scipy scikit-learn matplotlib tqdm
fi
export PATH="$VENV/bin:$PATH"
