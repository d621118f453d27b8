// Projection matrix P (MATH.md §9). One thread per (row, column group): one Philox call yields
// 4 Rademacher or 2 Gaussian entries, written as adjacent columns; consecutive threads take
// consecutive groups of one row so stores coalesce. T = uint16_t writes bfloat16 bit patterns of the
// unscaled Rademacher entries (±1 exact), the tensor-core projection's operand, in one pass.
#include <type_traits>

#include "common.cuh"
#include "fimoda/cuda.h"
#include "fimoda/philox.h"

namespace fimoda::cuda {
namespace {

template <typename T, int kPerCall>
__global__ void projection_kernel(T* __restrict__ out, int64_t rows, int64_t k, uint32_t k0,
                                  uint32_t k1, uint64_t row_offset, T scale) {
  const int64_t groups = (k + kPerCall - 1) / kPerCall;
  const int64_t total = rows * groups;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < total;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = t / groups, g = t - r * groups;
    const uint64_t index = row_offset + uint64_t(r);
    uint32_t w[4];
    philox4x32_10(uint32_t(g), lo32(index), hi32(index), kPerCall == 4 ? 0u : 1u, k0, k1, w);
    T* dst = out + r * k + g * kPerCall;
    const int64_t left = k - g * kPerCall, cols = left < kPerCall ? left : kPerCall;
#pragma unroll
    for (int q = 0; q < kPerCall; ++q) {
      if (q < cols) {
        if constexpr (std::is_same_v<T, uint16_t>) {
          dst[q] = (w[q] & 1u) ? uint16_t(0xBF80u) : uint16_t(0x3F80u);  // bfloat16 −1 / +1
        } else if constexpr (kPerCall == 4) {
          dst[q] = rademacher_entry<T>(w[q], scale);
        } else {
          dst[q] = gaussian_entry<T>(w[2 * q], w[2 * q + 1], scale);
        }
      }
    }
  }
}

}  // namespace

template <typename T>
void projection_matrix(T* out, int64_t rows, int64_t k, uint64_t seed, int kind, uint64_t row_offset,
                       double scale, std::uintptr_t stream) {
  require_device();
  if (rows == 0 || k == 0) return;
  const int threads = 256;
  if (kind == kRademacher) {
    const int64_t n = rows * ((k + 3) / 4);
    projection_kernel<T, 4><<<grid_for(n, threads), threads, 0, as_stream(stream)>>>(
        out, rows, k, lo32(seed), hi32(seed), row_offset, T(scale));
  } else {
    const int64_t n = rows * ((k + 1) / 2);
    projection_kernel<T, 2><<<grid_for(n, threads), threads, 0, as_stream(stream)>>>(
        out, rows, k, lo32(seed), hi32(seed), row_offset, T(scale));
  }
  check(cudaGetLastError(), "projection_matrix launch");
}

void rademacher_bf16(uint16_t* out, int64_t rows, int64_t k, uint64_t seed, uint64_t row_offset,
                     std::uintptr_t stream) {
  require_device();
  if (rows == 0 || k == 0) return;
  const int threads = 256;
  const int64_t n = rows * ((k + 3) / 4);
  projection_kernel<uint16_t, 4><<<grid_for(n, threads), threads, 0, as_stream(stream)>>>(
      out, rows, k, lo32(seed), hi32(seed), row_offset, uint16_t(0));
  check(cudaGetLastError(), "rademacher_bf16 launch");
}

template void projection_matrix<float>(float*, int64_t, int64_t, uint64_t, int, uint64_t, double,
                                       std::uintptr_t);
template void projection_matrix<double>(double*, int64_t, int64_t, uint64_t, int, uint64_t, double,
                                        std::uintptr_t);

}  // namespace fimoda::cuda
