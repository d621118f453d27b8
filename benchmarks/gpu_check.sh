#!/usr/bin/env bash
# One call on a lent GPU machine (H200, CUDA 13, torch 2.11, triton 3.6, no network): build, info,
# GPU tests, GPU benchmarks (with the peers found in .whl/); everything lands in $OUT within BUDGET_S.
#   OUT=/tmp/out bash benchmarks/gpu_check.sh          (from the repo root, or anywhere)
# Env: BUDGET_S (450), BENCH_ARGS (e.g. --quick), BENCHES (name[:max_s[:arg...]] list), FIMODA_BENCH_SHA
# (git sha for the records: the copied tree may have no .git), PYTHON (python3), DEVICE (cuda; cpu only
# for a dry run elsewhere).
# $OUT holds at most 8 files when it comes back: gpu_check.log (all steps), summary.txt (exit codes),
# RESULTS.md, results/<op>.jsonl (packed into results.tgz if that would exceed 8 files).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT/results"
LOG=$OUT/gpu_check.log SUMMARY=$OUT/summary.txt
: >"$LOG"; : >"$SUMMARY"
BUDGET_S=${BUDGET_S:-450} RESERVE_S=30   # the reserve is for rendering and packing at the end
PY=${PYTHON:-$(command -v python3 || command -v python)}
DEVICE=${DEVICE:-cuda}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# sm_90 only keeps the build short; FIMODA_CUDA=1 makes a missing nvcc an error instead of a CPU-only build
export CMAKE_CUDA_ARCHITECTURES=90 TORCH_CUDA_ARCH_LIST=9.0 FIMODA_CUDA=${FIMODA_CUDA:-1}
export CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) MAX_JOBS=$(nproc)
export FIMODA_BENCH_SHA=${FIMODA_BENCH_SHA:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
LAST_RC=0

# step NAME MAX_S SHOW CMD...: run CMD under a timeout capped by the budget left, append its output
# to the log, print its last SHOW lines (25 on failure), record rc and seconds in summary.txt.
step() {
  local name=$1 max=$2 show=$3 start=$SECONDS tmp rc t left
  shift 3
  left=$((BUDGET_S - SECONDS - RESERVE_S)); t=$((max < left ? max : left))
  if ((t < 5)); then
    printf '%-44s skipped (budget spent)\n' "$name" | tee -a "$SUMMARY"; LAST_RC=124; return 0
  fi
  tmp=$(mktemp)
  echo "=== $name (timeout ${t}s): $*" | tee -a "$LOG"
  if timeout -k 5 "$t" "$@" >"$tmp" 2>&1; then rc=0; else rc=$?; fi
  cat "$tmp" >>"$LOG"
  ((rc == 0)) || show=25
  ((show == 0)) || tail -n "$show" "$tmp" | sed 's/^/    /'
  rm -f "$tmp"
  printf '%-44s rc=%-3s %4ss%s\n' "$name" "$rc" "$((SECONDS - start))" \
    "$( ((rc == 124)) && echo ' TIMEOUT' || true)" | tee -a "$SUMMARY"
  LAST_RC=$rc
}

echo "gpu_check: $(date -u +%FT%TZ) sha=$FIMODA_BENCH_SHA python=$PY device=$DEVICE budget=${BUDGET_S}s" | tee -a "$LOG"
step nvidia-smi 20 12 nvidia-smi
# peers (bench extra) travel as files in .whl/ (git-ignored): pure-Python wheels go to /tmp/site; fast_jl
# (traker's CUDA projector, an sdist pinned to sm_70, which CUDA 13 dropped) builds for sm_90 in the
# background while ours builds
[ -d .whl ] && export PYTHONPATH="$PYTHONPATH:/tmp/site"
if compgen -G ".whl/*.whl" >/dev/null; then
  step peers-install 60 2 "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
fi
FJL_PID=
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)")")}
if compgen -G ".whl/fast_jl-*.tar.gz" >/dev/null; then
  # a broken peer must not stop the run: these steps may fail, the build then reports it
  mkdir -p /tmp/fjl && tar xzf "$(compgen -G '.whl/fast_jl-*.tar.gz' | head -n 1)" -C /tmp/fjl || true
  sed -i "s/7.0+PTX/9.0/" /tmp/fjl/fast_jl-*/setup.py || true
  (set +e; cd /tmp/fjl/fast_jl-* && timeout 300 "$PY" -m pip install --no-index --no-build-isolation --no-deps \
    --target /tmp/site . >"$OUT/fast_jl_build.log" 2>&1; echo "fast_jl build rc=$?" >>"$OUT/fast_jl_build.log") &
  FJL_PID=$!
fi
step build 240 3 "$PY" setup.py build_ext --inplace
step info 60 40 "$PY" -m fimoda_kernels.info
# every test that runs on the GPU (cuda backends, compiled triton kernels, cuda models), 8 processes
XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8" || true)
# shellcheck disable=SC2086
step pytest-gpu 200 3 "$PY" -m pytest -p no:cacheprovider $XDIST -q -m "cuda or triton" tests
if [ -n "$FJL_PID" ]; then wait "$FJL_PID" || true; tail -n 2 "$OUT/fast_jl_build.log" | tee -a "$LOG"; fi
# the GPU numbers, most wanted first; BENCH_ARGS applies to each (e.g. --quick)
bench() {  # bench NAME [MAX_S [ARGS...]] (MAX_S default 60)
  local name=$1 max=${2:-60}; shift $(($# < 2 ? $# : 2))
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of options
  step "$name${*:+ $*}" "$max" 30 "$PY" "benchmarks/$name.py" --device "$DEVICE" --out "$OUT/results" ${BENCH_ARGS:-} "$@"
}
for spec in ${BENCHES:-"bench_further_training:150:--study" "bench_further_training:40:--profile" \
    "bench_projection:100:--time-limit:70" \
    bench_further_training:90 bench_ekfac:60 \
    "bench_projection:60:--dtype:bfloat16:--time-limit:40" bench_grad_dot:45 "bench_methods:60:--cases:energy" \
    bench_solvers:60}; do
  IFS=: read -r -a parts <<<"$spec"
  bench "${parts[@]}"
done

RESERVE_S=0
step render 30 2 "$PY" benchmarks/render_results.py --results "$OUT/results" --output "$OUT/RESULTS.md"
cat benchmarks/.peaks-*.json >>"$LOG" 2>/dev/null || true
# the device tool returns at most 8 files from $OUT: pack the results if they would not fit
if (($(find "$OUT" -type f | wc -l) > 8)); then
  tar czf "$OUT/results.tgz" -C "$OUT" results && rm -rf "$OUT/results"
fi
echo "=== summary ($SECONDS s)"
cat "$SUMMARY"
