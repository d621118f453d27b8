// K-FAC / EK-FAC kernels (MATH.md §6); the ops and their contracts are in fimoda_kernels/ops/ekfac.py.
//   ekfac_gram            C[dx, dy] += f(X)ᵀ f(Y) over rows, f = identity or square. Symmetric mode
//                         (factor accumulate, X = Y): only upper tiles work, each mirrored into the lower
//                         triangle. Square mode: the T = 1 eigenvalue correction (s̃²)ᵀ(ã²).
//   ekfac_rotated_square  L[d_out, d_in] += Σ_i (Σ_t s̃_{i,t} ã_{i,t}ᵀ)²: per 16 × 16 tile of L, each
//                         sample's rotated gradient tile is built in registers, squared and accumulated.
//   ekfac_scores          out[i, z] += Σ_t s̃_{i,t}ᵀ W_z ã_{i,t}: a block owns 16 samples × one test point;
//                         16 lanes per sample stride over d_out, reduced by warp shuffles.
// Simple 16 × 16 shared-memory tiles with FMA in the accumulation dtype (float32 or float64), no tensor
// cores. Deterministic: no atomics, every sum in a fixed order.
#include <climits>
#include <stdexcept>
#include <string>

#include "common.cuh"
#include "fimoda/cuda.h"

namespace fimoda::cuda {
namespace {

constexpr int kTile = 16;

template <typename T, bool kSquare>
__device__ __forceinline__ T load_or_zero(const T* p, bool ok) {
  if (!ok) return T(0);
  const T v = p[0];
  return kSquare ? v * v : v;
}

template <typename T, bool kSymmetric, bool kSquare>
__global__ void gram_kernel(const T* __restrict__ x, const T* __restrict__ y, T* __restrict__ c, int64_t rows,
                            int64_t dx, int64_t dy) {
  const int64_t ti = blockIdx.y, tj = blockIdx.x;
  if (kSymmetric && ti > tj) return;  // lower tiles are mirrors of upper ones
  __shared__ T xs[kTile][kTile + 1];
  __shared__ T ys[kTile][kTile + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t i = ti * kTile + ty, j = tj * kTile + tx;
  T acc = 0;
  for (int64_t r0 = 0; r0 < rows; r0 += kTile) {
    const int64_t r = r0 + ty;
    const int64_t cx = ti * kTile + tx, cy = tj * kTile + tx;
    xs[ty][tx] = load_or_zero<T, kSquare>(x + r * dx + cx, r < rows && cx < dx);
    ys[ty][tx] = load_or_zero<T, kSquare>(y + r * dy + cy, r < rows && cy < dy);
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kTile; ++k) acc += xs[k][ty] * ys[k][tx];
    __syncthreads();
  }
  if (i < dx && j < dy) {
    c[i * dy + j] += acc;
    if (kSymmetric && ti < tj) c[j * dy + i] += acc;
  }
}

template <typename T>
__global__ void rotated_square_kernel(const T* __restrict__ sr, const T* __restrict__ ar, T* __restrict__ L,
                                      int64_t n, int64_t T_len, int64_t d_out, int64_t d_in) {
  __shared__ T ss[kTile][kTile + 1];  // [t][o]
  __shared__ T as[kTile][kTile + 1];  // [t][j]
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t o0 = int64_t(blockIdx.y) * kTile, j0 = int64_t(blockIdx.x) * kTile;
  T acc = 0;
  for (int64_t i = 0; i < n; ++i) {
    const T* s_i = sr + i * T_len * d_out;
    const T* a_i = ar + i * T_len * d_in;
    T p = 0;
    for (int64_t t0 = 0; t0 < T_len; t0 += kTile) {
      const int64_t t = t0 + ty;
      ss[ty][tx] = (t < T_len && o0 + tx < d_out) ? s_i[t * d_out + o0 + tx] : T(0);
      as[ty][tx] = (t < T_len && j0 + tx < d_in) ? a_i[t * d_in + j0 + tx] : T(0);
      __syncthreads();
#pragma unroll
      for (int k = 0; k < kTile; ++k) p += ss[k][ty] * as[k][tx];
      __syncthreads();
    }
    acc += p * p;
  }
  const int64_t o = o0 + ty, j = j0 + tx;
  if (o < d_out && j < d_in) L[o * d_in + j] += acc;
}

template <typename T>
__global__ void scores_kernel(const T* __restrict__ sr, const T* __restrict__ ar, const T* __restrict__ W,
                              T* __restrict__ out, int64_t n, int64_t T_len, int64_t m, int64_t z0, int64_t d_out,
                              int64_t d_in) {
  const int tx = threadIdx.x, ty = threadIdx.y;  // 16 lanes (tx) per sample (ty): half a warp
  const int64_t i = int64_t(blockIdx.x) * kTile + ty;
  const int64_t z = z0 + blockIdx.y;
  T acc = 0;
  if (i < n) {
    const T* w = W + z * d_out * d_in;
    for (int64_t t = 0; t < T_len; ++t) {
      const T* a = ar + (i * T_len + t) * d_in;
      const T* s = sr + (i * T_len + t) * d_out;
      for (int64_t o = tx; o < d_out; o += kTile) {
        const T* wo = w + o * d_in;
        T yv = 0;
        for (int64_t j = 0; j < d_in; ++j) yv += wo[j] * a[j];
        acc += s[o] * yv;
      }
    }
  }
#pragma unroll
  for (int off = kTile / 2; off > 0; off /= 2) acc += __shfl_down_sync(0xffffffffu, acc, off, kTile);
  if (i < n && tx == 0) out[i * m + z] += acc;
}

void check_sizes(const char* what, std::initializer_list<int64_t> sizes) {
  for (int64_t v : sizes) {
    if (v < 0) throw std::invalid_argument(std::string(what) + ": sizes must be >= 0");
  }
}

template <typename T>
void launch_gram(const T* x, const T* y, T* c, int64_t rows, int64_t dx, int64_t dy, bool symmetric, bool square,
                 cudaStream_t st) {
  const int64_t tx = (dy + kTile - 1) / kTile, ty = (dx + kTile - 1) / kTile;
  if (tx > INT_MAX || ty > 65535) throw std::invalid_argument("ekfac_gram: factor too wide");
  const dim3 grid(static_cast<unsigned>(tx), static_cast<unsigned>(ty)), block(kTile, kTile);
  if (symmetric && square) gram_kernel<T, true, true><<<grid, block, 0, st>>>(x, y, c, rows, dx, dy);
  else if (symmetric) gram_kernel<T, true, false><<<grid, block, 0, st>>>(x, y, c, rows, dx, dy);
  else if (square) gram_kernel<T, false, true><<<grid, block, 0, st>>>(x, y, c, rows, dx, dy);
  else gram_kernel<T, false, false><<<grid, block, 0, st>>>(x, y, c, rows, dx, dy);
  check(cudaGetLastError(), "ekfac_gram");
}

}  // namespace

void ekfac_gram(const void* x, const void* y, void* c, bool fp64, int64_t rows, int64_t dx, int64_t dy, bool symmetric,
                bool square, std::uintptr_t stream) {
  require_device();
  check_sizes("ekfac_gram", {rows, dx, dy});
  if (rows == 0 || dx == 0 || dy == 0) return;
  const cudaStream_t st = as_stream(stream);
  if (fp64) {
    launch_gram(static_cast<const double*>(x), static_cast<const double*>(y), static_cast<double*>(c), rows, dx, dy,
                symmetric, square, st);
  } else {
    launch_gram(static_cast<const float*>(x), static_cast<const float*>(y), static_cast<float*>(c), rows, dx, dy,
                symmetric, square, st);
  }
}

void ekfac_rotated_square(const void* sr, const void* ar, void* L, bool fp64, int64_t n, int64_t T, int64_t d_out,
                          int64_t d_in, std::uintptr_t stream) {
  require_device();
  check_sizes("ekfac_rotated_square", {n, T, d_out, d_in});
  if (n == 0 || T == 0 || d_out == 0 || d_in == 0) return;
  const int64_t gx = (d_in + kTile - 1) / kTile, gy = (d_out + kTile - 1) / kTile;
  if (gx > INT_MAX || gy > 65535) throw std::invalid_argument("ekfac_rotated_square: layer too wide");
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), block(kTile, kTile);
  const cudaStream_t st = as_stream(stream);
  if (fp64) {
    rotated_square_kernel<double><<<grid, block, 0, st>>>(static_cast<const double*>(sr),
                                                          static_cast<const double*>(ar), static_cast<double*>(L), n,
                                                          T, d_out, d_in);
  } else {
    rotated_square_kernel<float><<<grid, block, 0, st>>>(static_cast<const float*>(sr), static_cast<const float*>(ar),
                                                         static_cast<float*>(L), n, T, d_out, d_in);
  }
  check(cudaGetLastError(), "ekfac_rotated_square");
}

void ekfac_scores(const void* sr, const void* ar, const void* W, void* out, bool fp64, int64_t n, int64_t T, int64_t m,
                  int64_t d_out, int64_t d_in, std::uintptr_t stream) {
  require_device();
  check_sizes("ekfac_scores", {n, T, m, d_out, d_in});
  if (n == 0 || m == 0 || T == 0 || d_out == 0 || d_in == 0) return;
  const int64_t gx = (n + kTile - 1) / kTile;
  if (gx > INT_MAX) throw std::invalid_argument("ekfac_scores: too many training rows in one call");
  const cudaStream_t st = as_stream(stream);
  for (int64_t z0 = 0; z0 < m; z0 += 65535) {  // grid.y is capped at 65535 test points per launch
    const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(m - z0 < 65535 ? m - z0 : 65535));
    const dim3 block(kTile, kTile);
    if (fp64) {
      scores_kernel<double><<<grid, block, 0, st>>>(static_cast<const double*>(sr), static_cast<const double*>(ar),
                                                    static_cast<const double*>(W), static_cast<double*>(out), n, T,
                                                    m, z0, d_out, d_in);
    } else {
      scores_kernel<float><<<grid, block, 0, st>>>(static_cast<const float*>(sr), static_cast<const float*>(ar),
                                                   static_cast<const float*>(W), static_cast<float*>(out), n, T, m,
                                                   z0, d_out, d_in);
    }
    check(cudaGetLastError(), "ekfac_scores");
  }
}

}  // namespace fimoda::cuda
