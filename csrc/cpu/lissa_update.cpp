// Fused LiSSA update (MATH.md §5): out = v + (1 − d)·h − mh / s over [r, p] row-major blocks, with
// each row's squared norm ‖out_r‖² from the same pass (divergence checks cost no extra read).
//
// Work is cut into (row, column-chunk) tasks so that both many short rows and a few long rows keep
// every OpenMP thread busy; each task writes its partial sum to its own slot and the partials are
// added per row in chunk order afterwards, so the norms do not depend on the thread count.
// The loop is streaming (three reads, one write per element): memory-bound, left to the
// compiler's auto-vectorization. Sums accumulate in double for both element types.
#include <algorithm>
#include <vector>

#include "fimoda/cpu.h"

namespace fimoda::cpu {

template <typename T>
void lissa_update(const T* h, const T* v, const T* mh, T* out, double* sq_norms, int64_t r, int64_t p,
                  double scale, double damping) {
  constexpr int64_t kChunk = 8192;  // elements per task: 32-64 KiB per operand, L2-resident
  const int64_t chunks = std::max<int64_t>(1, (p + kChunk - 1) / kChunk);
  const int64_t tasks = r * chunks;
  const T keep = T(1.0 - damping);
  const T inv_scale = T(1.0 / scale);
  std::vector<double> partial(static_cast<size_t>(tasks), 0.0);
#pragma omp parallel for schedule(static) if (tasks * kChunk > 32768)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t row = t / chunks, c0 = (t % chunks) * kChunk, c1 = std::min(p, c0 + kChunk);
    const int64_t base = row * p;
    const T* hr = h + base;
    const T* vr = v + base;
    const T* mr = mh + base;
    T* orow = out + base;  // may alias h, v or mh: each element is read before it is written
    double acc = 0.0;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = c0; j < c1; ++j) {
      const T x = vr[j] + keep * hr[j] - mr[j] * inv_scale;
      orow[j] = x;
      acc += double(x) * double(x);
    }
    partial[t] = acc;
  }
  for (int64_t row = 0; row < r; ++row) {
    double s = 0.0;
    for (int64_t c = 0; c < chunks; ++c) s += partial[row * chunks + c];
    sq_norms[row] = s;
  }
}

template void lissa_update<float>(const float*, const float*, const float*, float*, double*, int64_t, int64_t,
                                  double, double);
template void lissa_update<double>(const double*, const double*, const double*, double*, double*, int64_t,
                                   int64_t, double, double);

}  // namespace fimoda::cpu
