#!/usr/bin/env bash
# The main job: set up, report the build and the backends, then run the default FiMODA study
# (`fimoda run`: diabetes, all nine methods vs the multi-seed leave-one-out further-training gold
# standard) and print its summary table. Artifacts go to runs/default/ (results.json, scores.npz,
# curves.csv, PNG plots); extra arguments are passed to `fimoda run` (e.g. --dataset digits).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$ROOT"
python -m fimoda_kernels.info
python -m fimoda_kernels run --out runs/default "$@"
