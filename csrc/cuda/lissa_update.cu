// Fused LiSSA update (MATH.md §5): out = v + (1 − d)·h − mh / s over contiguous [r, p] blocks, and the
// squared norm of every output row from the same pass.
//
// Grid (chunks, rows): block (c, i) handles elements [c·kChunk, (c+1)·kChunk) of row i (rows beyond
// 65535 by a grid-stride loop over y), reduces its sum of squares in a fixed tree (warp shuffles, then
// shared memory) and writes it to partials[i·chunks + c]. A second kernel adds each row's partials in a
// fixed tree as well: deterministic, no atomics. Accumulation in float32 for float32, float64 for float64.
#include "common.cuh"
#include "fimoda/cuda.h"

namespace fimoda::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = kThreads * 8;  // elements per block and row

template <typename T>
__device__ T block_sum(T x) {
  __shared__ T warp_sums[kThreads / 32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = x;
  __syncthreads();
  T total = 0;
  if (warp == 0) {
    total = lane < kThreads / 32 ? warp_sums[lane] : T(0);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) total += __shfl_down_sync(0xffffffffu, total, o);
  }
  __syncthreads();  // warp_sums may be reused by the caller's next block_sum
  return total;     // valid in thread 0
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
update_kernel(const T* h, const T* v, const T* mh, T* out, T* partials, int64_t r, int64_t p, int64_t chunks,
              T keep, T inv_scale) {
  const int64_t c0 = int64_t(blockIdx.x) * kChunk;
  const int64_t c1 = c0 + kChunk < p ? c0 + kChunk : p;
  for (int64_t row = blockIdx.y; row < r; row += gridDim.y) {
    const int64_t base = row * p;
    T acc = 0;
    for (int64_t j = c0 + threadIdx.x; j < c1; j += kThreads) {
      const T x = v[base + j] + keep * h[base + j] - mh[base + j] * inv_scale;  // out may alias: read first
      out[base + j] = x;
      acc += x * x;
    }
    const T total = block_sum(acc);
    if (threadIdx.x == 0) partials[row * chunks + blockIdx.x] = total;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
row_sum_kernel(const T* partials, T* sq_norms, int64_t r, int64_t chunks) {
  for (int64_t row = blockIdx.x; row < r; row += gridDim.x) {
    T acc = 0;
    for (int64_t c = threadIdx.x; c < chunks; c += kThreads) acc += partials[row * chunks + c];
    const T total = block_sum(acc);
    if (threadIdx.x == 0) sq_norms[row] = total;
  }
}

template <typename T>
void launch(const void* h, const void* v, const void* mh, void* out, void* sq_norms, void* partials, int64_t r,
            int64_t p, double scale, double damping, cudaStream_t stream) {
  const int64_t chunks = lissa_update_partials(1, p);
  const dim3 grid(static_cast<unsigned int>(chunks), static_cast<unsigned int>(r < 65535 ? r : 65535));
  update_kernel<T><<<grid, kThreads, 0, stream>>>(
      static_cast<const T*>(h), static_cast<const T*>(v), static_cast<const T*>(mh), static_cast<T*>(out),
      static_cast<T*>(partials), r, p, chunks, T(1.0 - damping), T(1.0 / scale));
  check(cudaGetLastError(), "lissa_update launch");
  row_sum_kernel<T><<<grid_for(r, 1), kThreads, 0, stream>>>(static_cast<const T*>(partials),
                                                            static_cast<T*>(sq_norms), r, chunks);
  check(cudaGetLastError(), "lissa_update row-sum launch");
}

}  // namespace

int64_t lissa_update_partials(int64_t r, int64_t p) {
  const int64_t chunks = (p + kChunk - 1) / kChunk;
  return r * (chunks > 0 ? chunks : 1);
}

void lissa_update(const void* h, const void* v, const void* mh, void* out, void* sq_norms, void* partials,
                  int dtype, int64_t r, int64_t p, double scale, double damping, std::uintptr_t stream) {
  require_device();
  if (dtype != 0 && dtype != 3) throw std::invalid_argument("lissa_update: dtype code must be 0 or 3");
  if (r <= 0) return;
  if (p > int64_t(kChunk) * 2147483647LL) throw std::invalid_argument("lissa_update: p too large");
  if (dtype == 0) {
    launch<float>(h, v, mh, out, sq_norms, partials, r, p, scale, damping, as_stream(stream));
  } else {
    launch<double>(h, v, mh, out, sq_norms, partials, r, p, scale, damping, as_stream(stream));
  }
}

}  // namespace fimoda::cuda
