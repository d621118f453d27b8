// Projection of per-sample gradients (MATH.md §9): out[n, k] = X[n, p] @ P[row_offset : row_offset + p, :k]
// with P generated on the fly by Philox, never stored. Two ops share one tiled GEMM kernel and differ
// only in how a tile of X is formed:
//   project        X = grads [n, p] (float32, float16, bfloat16 or float64), read from memory;
//   project_linear X[i, o·d_in + c] = Σ_t s[i,t,o]·a[i,t,c] (the per-sample Linear weight gradient) and,
//                  with a bias, X[i, d_out·d_in + o] = Σ_t s[i,t,o]; formed per K-step in shared
//                  memory, never written to global memory.
//
// Tiling (the micro-tile GEMM machinery of tile_gemm.cuh): a block of 256 threads computes a
// kBM × kBN = 64 × 64 tile of out, each thread a 4 × 4 register micro-tile (rows 4·ty .. 4·ty+3,
// columns 4·tx .. 4·tx+3). Per K-step of kBK = 32 parameter rows the block (a) forms the X tile
// [kBM, kBK] in shared memory, transposed (Xs[kk][m]) and converted to the compute type, (b) generates
// the P tile [kBK, kBN] with whole Philox calls (one call = 4 Rademacher or 2 Gaussian adjacent
// columns, exactly the counter layout of projection_matrix), (c) __syncthreads, multiplies,
// __syncthreads. No tensor cores: fp32 FMA (fp64 for float64 inputs).
//
// Split-K: when the n × k output has fewer than kTargetBlocks tiles, the p range is split over
// gridDim.z; each split writes its own [n, k] slice of a scratch buffer (cudaMallocAsync on the
// caller's stream) and a second kernel sums the slices in a fixed order. The split count depends only
// on (n, p, k), not on the device, so results are bitwise reproducible. No atomics.
#include <climits>
#include <stdexcept>
#include <string>

#include "common.cuh"
#include "fimoda/cuda.h"
#include "fimoda/philox.h"
#include "tile_gemm.cuh"

namespace fimoda::cuda {
namespace {

static_assert((kBK * (kBN / 4)) % kThreads == 0 && (kBK * (kBN / 2)) % kThreads == 0,
              "whole Philox calls per thread");

// q = x / d, r = x % d for x >= 0, d >= 1; the 32-bit divide when both fit (the common case).
__device__ __forceinline__ void divmod(int64_t x, int64_t d, int64_t& q, int64_t& r) {
  if (((static_cast<uint64_t>(x) | static_cast<uint64_t>(d)) >> 32) == 0) {
    const uint32_t x32 = static_cast<uint32_t>(x), d32 = static_cast<uint32_t>(d);
    const uint32_t q32 = x32 / d32;
    q = q32;
    r = x32 - q32 * d32;
  } else {
    q = x / d;
    r = x - q * d;
  }
}

// ---------------------------------------------------------------------------- X-tile loaders
// The Loader interface of tile_gemm.cuh over parameter rows pp (0 <= pp < p) and samples i (0 <= i < n):
// DenseLoader (tile_gemm.cuh) reads grads [n, p]; LinearLoader forms the Linear weight gradient entry.

template <typename In>
struct LinearLoader {
  using Acc = typename AccOf<In>::type;
  struct Col {
    int64_t o;  // output row (weight) or bias entry
    int64_t c;  // input column; -1 for a bias entry
  };
  const In* a;  // [n, T, d_in]
  const In* s;  // [n, T, d_out]
  int64_t T, d_in, d_out;

  __device__ __forceinline__ Col column(int64_t pp) const {
    const int64_t weight = d_out * d_in;
    if (pp >= weight) return {pp - weight, -1};  // bias entry pp − d_out·d_in (d_in may be 0)
    int64_t o, c;
    divmod(pp, d_in, o, c);
    return {o, c};
  }
  __device__ __forceinline__ Acc load(int64_t i, const Col& col) const {
    const In* si = s + i * T * d_out + col.o;
    Acc sum = Acc(0);
    if (col.c < 0) {
      for (int64_t t = 0; t < T; ++t) sum += to_acc(si[t * d_out]);
    } else {
      const In* ai = a + i * T * d_in + col.c;
      for (int64_t t = 0; t < T; ++t) sum += to_acc(si[t * d_out]) * to_acc(ai[t * d_in]);
    }
    return sum;
  }
};

// ---------------------------------------------------------------------------- the GEMM kernel
// Grid: x strides over the tiles_m × tiles_n output tiles (tile = tm · tiles_n + tn, so neighbouring
// blocks share X rows in L2); z = split of the K-tiles [z·kt_per_split, min(k_tiles, (z+1)·kt_per_split)).
// Writes the full in-bounds part of its tile to out + z·n·k (every in-bounds element, so the
// split-K scratch needs no initialization).
template <class Loader, int kKind>
__global__ void __launch_bounds__(kThreads, 2)
project_gemm_kernel(Loader loader, typename Loader::Acc* __restrict__ out, int64_t n, int64_t p,
                    int64_t k, int64_t tiles_n, int64_t tiles, int64_t k_tiles, int64_t kt_per_split,
                    uint32_t key0, uint32_t key1, uint64_t row_offset, typename Loader::Acc scale) {
  using Acc = typename Loader::Acc;
  __shared__ __align__(16) Acc Xs[kBK][kLdT];  // X tile, transposed: Xs[kk][m]
  __shared__ __align__(16) Acc Ps[kBK][kBN];   // P tile: Ps[kk][jj]

  const int tid = threadIdx.x;
  const int tx = micro_tx(tid), ty = micro_ty(tid);
  const LoadLane lane = load_lane(tid);

  const int64_t kt_begin = int64_t(blockIdx.z) * kt_per_split;
  const int64_t kt_end = kt_begin + kt_per_split < k_tiles ? kt_begin + kt_per_split : k_tiles;
  Acc* dst = out + int64_t(blockIdx.z) * n * k;

  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {  // uniform per block
    const int64_t tm = tile / tiles_n;
    const int64_t m0 = tm * kBM, n0 = (tile - tm * tiles_n) * kBN;
    Acc acc[4][4];
    zero_micro_tile(acc);

    for (int64_t kt = kt_begin; kt < kt_end; ++kt) {
      const int64_t p0 = kt * kBK;

      // (a) X tile [kBM, kBK] -> Xs[kk][m], zeros outside [0, n) × [0, p).
      load_tile_transposed(loader, Xs, m0, n, p0, p, lane);

      // (b) P tile [kBK, kBN] -> Ps[kk][jj]: rows row_offset + p0 + kk, columns n0 + jj; zeros past p, k.
      if constexpr (kKind == kRademacher) {
        constexpr int kCalls = kBN / 4;  // Philox calls per P row
#pragma unroll
        for (int q = 0; q < kBK * kCalls / kThreads; ++q) {
          const int e = tid + q * kThreads;
          const int kk = e / kCalls, g = e % kCalls;
          const int64_t pp = p0 + kk, j = n0 + 4 * g;  // j % 4 == 0: word u is column j + u
          Acc v[4] = {Acc(0), Acc(0), Acc(0), Acc(0)};
          if (pp < p && j < k) {
            const uint64_t index = row_offset + static_cast<uint64_t>(pp);
            uint32_t w[4];
            philox4x32_10(static_cast<uint32_t>(j >> 2), lo32(index), hi32(index), 0u, key0, key1, w);
#pragma unroll
            for (int u = 0; u < 4; ++u) {
              if (j + u < k) v[u] = rademacher_entry<Acc>(w[u], scale);
            }
          }
          store4(&Ps[kk][4 * g], v);
        }
      } else {
        constexpr int kCalls = kBN / 2;
#pragma unroll
        for (int q = 0; q < kBK * kCalls / kThreads; ++q) {
          const int e = tid + q * kThreads;
          const int kk = e / kCalls, g = e % kCalls;
          const int64_t pp = p0 + kk, j = n0 + 2 * g;  // j even: words (0, 1) -> j, (2, 3) -> j + 1
          Acc v0 = Acc(0), v1 = Acc(0);
          if (pp < p && j < k) {
            const uint64_t index = row_offset + static_cast<uint64_t>(pp);
            uint32_t w[4];
            philox4x32_10(static_cast<uint32_t>(j >> 1), lo32(index), hi32(index), 1u, key0, key1, w);
            v0 = gaussian_entry<Acc>(w[0], w[1], scale);
            if (j + 1 < k) v1 = gaussian_entry<Acc>(w[2], w[3], scale);
          }
          store2(&Ps[kk][2 * g], v0, v1);
        }
      }
      __syncthreads();

      // (c) acc[r][c] += Σ_kk X[4ty + r, kk] · P[kk, 4tx + c]
      multiply_micro_tile(Xs, Ps, tx, ty, acc);
      __syncthreads();  // before the next K-step (or tile) overwrites Xs, Ps
    }

    store_micro_tile(acc, dst, m0, n0, n, k, tx, ty);
  }
}

template <class Loader>
void launch_project(const Loader& loader, typename Loader::Acc* out, int64_t n, int64_t p, int64_t k,
                    uint64_t seed, int kind, uint64_t row_offset, double scale, cudaStream_t stream,
                    const char* what) {
  using Acc = typename Loader::Acc;
  if (n == 0 || k == 0) return;
  if (p == 0) {  // empty sum: the output is zero
    check(cudaMemsetAsync(out, 0, sizeof(Acc) * size_t(n) * size_t(k), stream), what);
    return;
  }
  const int64_t tiles_n = ceil_div(k, kBN);
  const int64_t tiles = ceil_div(n, kBM) * tiles_n;
  const int64_t k_tiles = ceil_div(p, kBK);
  const SplitPlan plan = plan_splits(tiles, k_tiles);
  const int64_t splits = plan.splits, kt_per_split = plan.kt_per_split;

  AsyncBuffer scratch;
  Acc* target = split_target(scratch, out, splits, n, k, stream, what);
  const dim3 grid(static_cast<unsigned int>(tiles < INT_MAX ? tiles : INT_MAX), 1,
                  static_cast<unsigned int>(splits));
  const uint32_t key0 = lo32(seed), key1 = hi32(seed);
  if (kind == kRademacher) {
    project_gemm_kernel<Loader, kRademacher><<<grid, kThreads, 0, stream>>>(
        loader, target, n, p, k, tiles_n, tiles, k_tiles, kt_per_split, key0, key1, row_offset, Acc(scale));
  } else {
    project_gemm_kernel<Loader, kGaussian><<<grid, kThreads, 0, stream>>>(
        loader, target, n, p, k, tiles_n, tiles, k_tiles, kt_per_split, key0, key1, row_offset, Acc(scale));
  }
  check(cudaGetLastError(), what);
  reduce_splits(target, out, n, k, splits, stream, what);
}

void check_args(int dtype, int kind, int64_t n, int64_t k, const char* what) {
  if (dtype < 0 || dtype > 3) {
    throw std::invalid_argument(std::string(what) + ": dtype code must be 0 (float32), 1 (float16), "
                                "2 (bfloat16) or 3 (float64), got " + std::to_string(dtype));
  }
  if (kind != kRademacher && kind != kGaussian) {
    throw std::invalid_argument(std::string(what) + ": kind must be 0 (Rademacher) or 1 (Gaussian), got " +
                                std::to_string(kind));
  }
  if (n < 0 || k < 0) {
    throw std::invalid_argument(std::string(what) + ": sizes must be >= 0");
  }
}

// One thread per element of a row (grid-stride over columns), one block row per source row (grid-stride
// over rows): no division per element; reads coalesce along the row.
template <typename In>
__global__ void split_bf16_kernel(const In* __restrict__ src, int64_t rows, int64_t cols, int64_t ld,
                                  __nv_bfloat16* __restrict__ dst, int parts) {
  const int64_t plane = rows * cols;
  for (int64_t i = blockIdx.y; i < rows; i += gridDim.y) {
    for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < cols;
         j += int64_t(gridDim.x) * blockDim.x) {
      float r = to_acc(src[i * ld + j]);
      for (int q = 0; q < parts; ++q) {
        const __nv_bfloat16 h = __float2bfloat16_rn(r);
        dst[q * plane + i * cols + j] = h;
        r -= __bfloat162float(h);  // exact: h is r rounded to 8 significant bits
      }
    }
  }
}

}  // namespace

void split_bf16(const void* src, int dtype, int64_t rows, int64_t cols, int64_t ld, void* dst, int parts,
                std::uintptr_t stream) {
  require_device();
  const char* what = "split_bf16";
  if (dtype != 0 && dtype != 1) {
    throw std::invalid_argument("split_bf16: dtype code must be 0 (float32) or 1 (float16), got " +
                                std::to_string(dtype));
  }
  if (parts < 1 || parts > 3 || rows < 0 || cols < 0 || ld < cols) {
    throw std::invalid_argument("split_bf16: expected 1 <= parts <= 3, rows, cols >= 0 and ld >= cols");
  }
  if (rows == 0 || cols == 0) return;
  const cudaStream_t st = as_stream(stream);
  constexpr int kSplitThreads = 256;
  const int64_t bx = ceil_div(cols, kSplitThreads);
  const dim3 grid(static_cast<unsigned int>(bx < 64 ? bx : 64),
                  static_cast<unsigned int>(rows < 65535 ? rows : 65535));
  auto* out = static_cast<__nv_bfloat16*>(dst);
  if (dtype == 0) {
    split_bf16_kernel<float><<<grid, kSplitThreads, 0, st>>>(static_cast<const float*>(src), rows, cols, ld, out,
                                                             parts);
  } else {
    split_bf16_kernel<__half><<<grid, kSplitThreads, 0, st>>>(static_cast<const __half*>(src), rows, cols, ld, out,
                                                              parts);
  }
  check(cudaGetLastError(), what);
}

void project(const void* grads, int dtype, void* out, int64_t n, int64_t p, int64_t k, uint64_t seed,
             int kind, uint64_t row_offset, double scale, std::uintptr_t stream) {
  require_device();
  const char* what = "project";
  check_args(dtype, kind, n, k, what);
  if (p < 0) throw std::invalid_argument("project: p must be >= 0");
  const cudaStream_t st = as_stream(stream);
  switch (dtype) {
    case 0:
      launch_project(DenseLoader<float>{static_cast<const float*>(grads), p}, static_cast<float*>(out), n, p,
                     k, seed, kind, row_offset, scale, st, what);
      break;
    case 1:
      launch_project(DenseLoader<__half>{static_cast<const __half*>(grads), p}, static_cast<float*>(out), n,
                     p, k, seed, kind, row_offset, scale, st, what);
      break;
    case 2:
      launch_project(DenseLoader<__nv_bfloat16>{static_cast<const __nv_bfloat16*>(grads), p},
                     static_cast<float*>(out), n, p, k, seed, kind, row_offset, scale, st, what);
      break;
    default:
      launch_project(DenseLoader<double>{static_cast<const double*>(grads), p}, static_cast<double*>(out), n,
                     p, k, seed, kind, row_offset, scale, st, what);
      break;
  }
}

void project_linear(const void* a, const void* s, int dtype, void* out, int64_t n, int64_t T, int64_t d_in,
                    int64_t d_out, bool bias, int64_t k, uint64_t seed, int kind, uint64_t row_offset,
                    double scale, std::uintptr_t stream) {
  require_device();
  const char* what = "project_linear";
  check_args(dtype, kind, n, k, what);
  if (T < 0 || d_in < 0 || d_out < 0) {
    throw std::invalid_argument("project_linear: T, d_in, d_out must be >= 0");
  }
  const int64_t p = d_out * d_in + (bias ? d_out : 0);
  const cudaStream_t st = as_stream(stream);
  switch (dtype) {
    case 0:
      launch_project(LinearLoader<float>{static_cast<const float*>(a), static_cast<const float*>(s), T, d_in,
                                         d_out},
                     static_cast<float*>(out), n, p, k, seed, kind, row_offset, scale, st, what);
      break;
    case 1:
      launch_project(LinearLoader<__half>{static_cast<const __half*>(a), static_cast<const __half*>(s), T,
                                          d_in, d_out},
                     static_cast<float*>(out), n, p, k, seed, kind, row_offset, scale, st, what);
      break;
    case 2:
      launch_project(LinearLoader<__nv_bfloat16>{static_cast<const __nv_bfloat16*>(a),
                                                 static_cast<const __nv_bfloat16*>(s), T, d_in, d_out},
                     static_cast<float*>(out), n, p, k, seed, kind, row_offset, scale, st, what);
      break;
    default:
      launch_project(LinearLoader<double>{static_cast<const double*>(a), static_cast<const double*>(s), T,
                                          d_in, d_out},
                     static_cast<double*>(out), n, p, k, seed, kind, row_offset, scale, st, what);
      break;
  }
}

}  // namespace fimoda::cuda
