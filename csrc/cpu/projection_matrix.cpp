// Projection matrix P (MATH.md §9) generated row by row, OpenMP over rows. Each row takes
// blocks of kBlock consecutive Philox calls (philox_simd.h), each call giving 4 Rademacher or
// 2 Gaussian columns. Float32 Gaussian entries are converted a whole block at a time by the
// vectorized Box–Muller of fast_math.h (same instruction set as the Philox, identical bits on
// each); float64 ones keep gaussian_entry<double> (libm log/cos, the reference's formula).
// Float32 Rademacher entries of whole blocks are written by the AVX-512/AVX2 sign-and-interleave of
// rademacher_simd.h (same dispatch; the generic path, the row tail and float64 keep the scalar loop).
#include <algorithm>
#include <cstring>
#include <type_traits>

#include "fast_math.h"
#include "fimoda/cpu.h"
#include "philox_simd.h"
#include "rademacher_simd.h"

namespace fimoda::cpu {
namespace {

// Float32 Gaussian entries of one Philox block: out[2l + h] from words (2h, 2h + 1) of lane l.
using GaussianBlockFn = void (*)(const PhiloxBlock&, float, float*);

GaussianBlockFn gaussian_block_impl() {
#if defined(__x86_64__) && defined(__GNUC__)
  const char* isa = philox_block_isa();  // follows FIMODA_SIMD and the CPU, like the Philox
  if (!std::strcmp(isa, "avx512")) return fastmath::gaussian_block_avx512<kBlock>;
  if (!std::strcmp(isa, "avx2")) return fastmath::gaussian_block_avx2<kBlock>;
#endif
  return fastmath::gaussian_block_generic<kBlock>;
}

// Float32 Rademacher entries of one whole Philox block: out[4l + q] from word q of lane l; null
// where the scalar loop of fill_row is used (generic instruction set).
using RademacherBlockFn = void (*)(const PhiloxBlock&, float, float*);

RademacherBlockFn rademacher_block_impl() {
#if defined(__x86_64__) && defined(__GNUC__)
  const char* isa = philox_block_isa();
  if (!std::strcmp(isa, "avx512")) return radsimd::rademacher_block_avx512<kBlock>;
  if (!std::strcmp(isa, "avx2")) return radsimd::rademacher_block_avx2<kBlock>;
#endif
  return nullptr;
}

// Columns [c0, c1) of one row: Philox blocks from the one holding column c0; blocks that lie
// wholly inside [c0, c1) are written in place, the partial first and last ones through vals.
template <typename T, int kKind>
void fill_row(PhiloxBlockFn philox, GaussianBlockFn gaussian_f32, RademacherBlockFn rademacher_f32, T* row,
              int64_t c0, int64_t c1, uint64_t index, uint32_t k0, uint32_t k1, T scale) {
  constexpr int kPerCall = kKind == kRademacher ? 4 : 2;
  constexpr int kPerBlock = kBlock * kPerCall;
  PhiloxBlock w;
  T vals[kPerBlock];
  for (int64_t g0 = c0 / kPerCall; g0 * kPerCall < c1; g0 += kBlock) {  // g0 < 2^32: k < 2^32 (Python)
    philox(uint32_t(g0), lo32(index), hi32(index), kKind == kRademacher ? 0u : 1u, k0, k1, w);
    const int64_t j0 = g0 * kPerCall;
    const bool whole = j0 >= c0 && c1 - j0 >= kPerBlock;
    T* dst = whole ? row + (j0 - c0) : vals;
    if constexpr (kKind == kGaussian && std::is_same_v<T, float>) {
      gaussian_f32(w, scale, dst);
    } else {
      if constexpr (kKind == kRademacher && std::is_same_v<T, float>) {
        if (whole && rademacher_f32 != nullptr) {
          rademacher_f32(w, scale, dst);
          continue;  // written in place: nothing to copy
        }
      }
      for (int l = 0; l < kBlock; ++l) {
        for (int q = 0; q < kPerCall; ++q) {
          dst[l * kPerCall + q] = kKind == kRademacher ? rademacher_entry<T>(w[q][l], scale)
                                                       : gaussian_entry<T>(w[2 * q][l], w[2 * q + 1][l], scale);
        }
      }
    }
    if (!whole) {
      const int64_t lo = std::max(j0, c0), hi = std::min(j0 + kPerBlock, c1);
      std::copy(vals + (lo - j0), vals + (hi - j0), row + (lo - c0));
    }
  }
}

}  // namespace

template <typename T>
void projection_matrix(T* out, int64_t rows, int64_t col_begin, int64_t cols, uint64_t seed, int kind,
                       uint64_t row_offset, double scale) {
  const uint32_t k0 = lo32(seed), k1 = hi32(seed);
  const PhiloxBlockFn philox = philox_block_impl();
  const GaussianBlockFn gaussian_f32 = gaussian_block_impl();
  const RademacherBlockFn rademacher_f32 = rademacher_block_impl();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const uint64_t index = row_offset + uint64_t(r);
    T* row = out + r * cols;
    const int64_t c1 = col_begin + cols;
    if (kind == kRademacher) {
      fill_row<T, kRademacher>(philox, gaussian_f32, rademacher_f32, row, col_begin, c1, index, k0, k1, T(scale));
    } else {
      fill_row<T, kGaussian>(philox, gaussian_f32, rademacher_f32, row, col_begin, c1, index, k0, k1, T(scale));
    }
  }
}

template void projection_matrix<float>(float*, int64_t, int64_t, int64_t, uint64_t, int, uint64_t, double);
template void projection_matrix<double>(double*, int64_t, int64_t, int64_t, uint64_t, int, uint64_t, double);

}  // namespace fimoda::cpu
