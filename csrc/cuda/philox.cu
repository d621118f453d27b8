// Philox4x32-10 over arrays of counters and keys (the op fimoda_kernels.philox4x32).
#include "common.cuh"
#include "fimoda/cuda.h"
#include "fimoda/philox.h"

namespace fimoda::cuda {
namespace {

__global__ void philox_kernel(const int64_t* __restrict__ counter, const int64_t* __restrict__ key,
                              int64_t* __restrict__ out, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    uint32_t w[4];
    philox4x32_10(uint32_t(counter[4 * i]), uint32_t(counter[4 * i + 1]), uint32_t(counter[4 * i + 2]),
                  uint32_t(counter[4 * i + 3]), uint32_t(key[2 * i]), uint32_t(key[2 * i + 1]), w);
#pragma unroll
    for (int q = 0; q < 4; ++q) out[4 * i + q] = w[q];
  }
}

}  // namespace

void philox4x32(const int64_t* counter, const int64_t* key, int64_t* out, int64_t n,
                std::uintptr_t stream) {
  require_device();
  if (n == 0) return;
  philox_kernel<<<grid_for(n, 256), 256, 0, as_stream(stream)>>>(counter, key, out, n);
  check(cudaGetLastError(), "philox4x32 launch");
}

}  // namespace fimoda::cuda
