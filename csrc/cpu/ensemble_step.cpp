// One optimizer step for M models at once (fimoda_kernels/ops/ensemble_step.py has the layout and the
// formulas). OpenMP over (parameter block, model, tile of 2048 entries): each entry is read and written
// once, parameters, gradient and state together; the per-model scalars are hoisted out of the tile loop
// and the optimizer kind is a template parameter, so the inner loops are branch-free and vectorize.
#include <cmath>

#include "fimoda/cpu.h"

namespace fimoda::cpu {
namespace {

constexpr int64_t kTile = 2048;

template <typename T, int kOpt, bool kMomentum, bool kDecay>
inline void update_tile(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ s1, T* __restrict__ s2,
                        int64_t n, const double* coef, const double* hp) {
  const T neg_lr = T(hp[0]), mom = T(hp[1]), wd = T(hp[2]), one_m_b1 = T(hp[3]), b2 = T(hp[4]),
          one_m_b2 = T(hp[5]), eps = T(hp[6]), decay = T(hp[7]);
  if (kOpt == kSgd) {
    const bool first = coef[1] != 0.0;
#pragma omp simd
    for (int64_t e = 0; e < n; ++e) {
      T d = g[e];
      if (kDecay) d = d + wd * p[e];
      if (kMomentum) {
        d = first ? d : s1[e] * mom + d;
        s1[e] = d;
      }
      p[e] = p[e] + neg_lr * d;
    }
  } else {
    const T neg_step = T(-coef[1]), bc2_sqrt = T(coef[2]);
#pragma omp simd
    for (int64_t e = 0; e < n; ++e) {
      T d = g[e], q = p[e];
      if (kOpt == kAdamW) q = q * decay;
      else if (kDecay) d = d + wd * q;
      const T m = s1[e] + one_m_b1 * (d - s1[e]);
      const T v = s2[e] * b2 + one_m_b2 * (d * d);
      const T denom = std::sqrt(v) / bc2_sqrt + eps;
      s1[e] = m;
      s2[e] = v;
      p[e] = q + (neg_step * m) / denom;
    }
  }
}

template <typename T, int kOpt, bool kMomentum, bool kDecay>
void run(T* params, const T* grads, T* state1, T* state2, const double* coef, const int64_t* segments,
         int64_t n_segments, int64_t M, const double* hp) {
#pragma omp parallel
  {
    int64_t base = 0;
    for (int64_t j = 0; j < n_segments; ++j) {
      const int64_t n = segments[j], tiles = (n + kTile - 1) / kTile;
#pragma omp for schedule(static) nowait
      for (int64_t t = 0; t < M * tiles; ++t) {
        const int64_t m = t / tiles, e0 = (t - m * tiles) * kTile;
        const double* c = coef + 3 * m;
        if (c[0] == 0.0) continue;  // inactive model: untouched
        const int64_t off = base + m * n + e0, len = n - e0 < kTile ? n - e0 : kTile;
        update_tile<T, kOpt, kMomentum, kDecay>(params + off, grads + off, state1 ? state1 + off : nullptr,
                                                state2 ? state2 + off : nullptr, len, c, hp);
      }
      base += M * n;
    }
  }
}

template <typename T, int kOpt>
void dispatch_flags(T* params, const T* grads, T* state1, T* state2, const double* coef, const int64_t* segments,
                    int64_t n_segments, int64_t M, const double* hp) {
  const bool momentum = hp[1] != 0.0, decay = hp[2] != 0.0;
  if (momentum && decay) run<T, kOpt, true, true>(params, grads, state1, state2, coef, segments, n_segments, M, hp);
  else if (momentum) run<T, kOpt, true, false>(params, grads, state1, state2, coef, segments, n_segments, M, hp);
  else if (decay) run<T, kOpt, false, true>(params, grads, state1, state2, coef, segments, n_segments, M, hp);
  else run<T, kOpt, false, false>(params, grads, state1, state2, coef, segments, n_segments, M, hp);
}

}  // namespace

template <typename T>
void ensemble_step(T* params, const T* grads, T* state1, T* state2, const double* coef, const int64_t* segments,
                   int64_t n_segments, int64_t M, int optimizer, const double* hp) {
  if (optimizer == kSgd) {
    dispatch_flags<T, kSgd>(params, grads, state1, state2, coef, segments, n_segments, M, hp);
  } else if (optimizer == kAdam) {
    dispatch_flags<T, kAdam>(params, grads, state1, state2, coef, segments, n_segments, M, hp);
  } else {
    dispatch_flags<T, kAdamW>(params, grads, state1, state2, coef, segments, n_segments, M, hp);
  }
}

template void ensemble_step<float>(float*, const float*, float*, float*, const double*, const int64_t*, int64_t,
                                   int64_t, int, const double*);
template void ensemble_step<double>(double*, const double*, double*, double*, const double*, const int64_t*,
                                    int64_t, int64_t, int, const double*);

}  // namespace fimoda::cpu
