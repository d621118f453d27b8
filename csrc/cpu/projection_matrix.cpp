// Projection matrix P (MATH.md §9) generated row by row, OpenMP over rows.
// Philox runs on a batch of kLanes consecutive column groups at once, written as fixed-length
// loops so the compiler vectorizes the 32x32->64 multiplies; target_clones picks AVX-512/AVX2 at
// load time without -march=native.
#include <algorithm>

#include "fimoda/cpu.h"
#include "fimoda/philox.h"

namespace fimoda::cpu {
namespace {

constexpr int kLanes = 16;

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FIMODA_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FIMODA_CLONES
#endif

// w[q][l] = Philox(c0 + l, c1, c2, c3; k0, k1) word q.
FIMODA_CLONES void philox_lanes(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                uint32_t k1, uint32_t w[4][kLanes]) {
  uint32_t x0[kLanes], x1[kLanes], x2[kLanes], x3[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    x0[l] = c0 + uint32_t(l);
    x1[l] = c1;
    x2[l] = c2;
    x3[l] = c3;
  }
  for (int round = 0; round < 10; ++round) {
    for (int l = 0; l < kLanes; ++l) {
      const uint64_t p0 = uint64_t(kPhiloxM0) * x0[l];
      const uint64_t p1 = uint64_t(kPhiloxM1) * x2[l];
      const uint32_t n0 = uint32_t(p1 >> 32) ^ x1[l] ^ k0;
      const uint32_t n2 = uint32_t(p0 >> 32) ^ x3[l] ^ k1;
      x1[l] = uint32_t(p1);
      x3[l] = uint32_t(p0);
      x0[l] = n0;
      x2[l] = n2;
    }
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  for (int l = 0; l < kLanes; ++l) {
    w[0][l] = x0[l];
    w[1][l] = x1[l];
    w[2][l] = x2[l];
    w[3][l] = x3[l];
  }
}

template <typename T>
void fill_row(T* row, int64_t k, uint64_t index, uint32_t k0, uint32_t k1, int kind, T scale) {
  const int per_call = kind == kRademacher ? 4 : 2;  // columns one Philox call serves
  const int64_t groups = (k + per_call - 1) / per_call;
  uint32_t w[4][kLanes];
  for (int64_t g0 = 0; g0 < groups; g0 += kLanes) {
    // Column groups beyond 2^32 never occur: k < 2^32 is checked in Python.
    philox_lanes(uint32_t(g0), lo32(index), hi32(index), kind == kRademacher ? 0u : 1u, k0, k1, w);
    const int64_t lanes = std::min<int64_t>(kLanes, groups - g0);
    for (int64_t l = 0; l < lanes; ++l) {
      const int64_t j0 = (g0 + l) * per_call;
      const int64_t cols = std::min<int64_t>(per_call, k - j0);
      for (int64_t q = 0; q < cols; ++q) {
        row[j0 + q] = kind == kRademacher
                          ? rademacher_entry<T>(w[q][l], scale)
                          : gaussian_entry<T>(w[2 * q][l], w[2 * q + 1][l], scale);
      }
    }
  }
}

}  // namespace

template <typename T>
void projection_matrix(T* out, int64_t rows, int64_t k, uint64_t seed, int kind, uint64_t row_offset,
                       double scale) {
  const uint32_t k0 = lo32(seed), k1 = hi32(seed);
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    fill_row<T>(out + r * k, k, row_offset + uint64_t(r), k0, k1, kind, T(scale));
  }
}

template void projection_matrix<float>(float*, int64_t, int64_t, uint64_t, int, uint64_t, double);
template void projection_matrix<double>(double*, int64_t, int64_t, uint64_t, int, uint64_t, double);

}  // namespace fimoda::cpu
