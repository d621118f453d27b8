#!/usr/bin/env bash
# The main job (until the study runner lands): set up, report the build and the backends, then
# run every benchmark in --quick mode on this machine and print the ratio tables.
# Results go to runs/bench-quick/ (benchmarks/RESULTS.md is only rewritten by full runs).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$ROOT"
python -m fimoda_kernels.info
OUT=runs/bench-quick
rm -rf "$OUT" && mkdir -p "$OUT"
for bench in benchmarks/bench_*.py; do
  python "$bench" --quick --out "$OUT"
done
python benchmarks/render_results.py --results "$OUT" --output "$OUT/RESULTS.md"
cat "$OUT/RESULTS.md"
