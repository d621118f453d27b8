// The shared-memory micro-tile GEMM machinery of the CUDA kernels (project.cu, grad_dot.cu).
//
// A block of kThreads = 256 threads computes a kBM × kBN = 64 × 64 tile of C = A · B, each thread a
// 4 × 4 register micro-tile: rows 4·ty .. 4·ty+3, columns 4·tx .. 4·tx+3 with tx = tid % 16,
// ty = tid / 16. Per K-step of kBK = 32 the block stages an A tile as As[kk][row] (transposed, rows
// padded by kXPad) and a B tile as Bs[kk][col] in shared memory, __syncthreads, multiplies with
// multiply_micro_tile, __syncthreads. No tensor cores: fp32 FMA (fp64 for float64 inputs).
//
// Operand tiles whose rows are rows of a row-major source (the per-sample gradients, the factors of
// grad_dot_factored) are staged with load_tile_transposed through a Loader:
//   Loader::Acc                 the compute type (float, or double for float64 inputs);
//   Loader::Col column(kk)      what is needed about source column kk (computed once per K-step);
//   Acc load(row, col)          the source element in the compute type.
//
// Split-K (deterministic): plan_splits picks a split count from the problem shape only (never from
// the device); each split writes its own [rows, cols] slice of a stream-ordered scratch buffer and
// reduce_splits_kernel sums the slices in a fixed order. No atomics anywhere.
//
// Everything here has internal linkage (anonymous namespace): each .cu file gets its own copy, so
// the template kernels never need cross-translation-unit registration.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common.cuh"

namespace fimoda::cuda {
namespace {

constexpr int kBM = 64;       // output rows per block tile
constexpr int kBN = 64;       // output columns per block tile
constexpr int kBK = 32;       // reduction (K) entries per K-step
constexpr int kThreads = 256; // 16 × 16 threads, 4 × 4 outputs each
constexpr int kXPad = 4;      // transposed-tile row padding: conflict-free stores, 16-byte aligned rows
constexpr int kLdT = kBM + kXPad;            // row length of a transposed operand tile
constexpr int64_t kTargetBlocks = 4 * 132;   // ≈ 4 blocks per SM of an H100/H200
constexpr int64_t kMinKTilesPerSplit = 8;    // a split covers at least 8 · kBK = 256 K entries

static_assert(kThreads == (kBM / 4) * (kBN / 4), "one 4x4 micro-tile per thread");
static_assert(kBM == 64 && kBK % 8 == 0, "the transposed-tile load mapping assumes 64 rows, kBK % 8 == 0");
static_assert(kBM == kBN, "load_tile_transposed stages both operands of a row-row product");

template <typename In>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ double to_acc(double v) { return v; }

// Shared-memory vector loads/stores; every address passed is 16-byte aligned (4 elements) or
// 8/16-byte aligned (2 elements) by construction of the tile layouts.
__device__ __forceinline__ void load4(const float* p, float v[4]) {
  const float4 t = *reinterpret_cast<const float4*>(p);
  v[0] = t.x; v[1] = t.y; v[2] = t.z; v[3] = t.w;
}
__device__ __forceinline__ void load4(const double* p, double v[4]) {
  const double2 a = reinterpret_cast<const double2*>(p)[0];
  const double2 b = reinterpret_cast<const double2*>(p)[1];
  v[0] = a.x; v[1] = a.y; v[2] = b.x; v[3] = b.y;
}
__device__ __forceinline__ void store4(float* p, const float v[4]) {
  *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
}
__device__ __forceinline__ void store4(double* p, const double v[4]) {
  reinterpret_cast<double2*>(p)[0] = make_double2(v[0], v[1]);
  reinterpret_cast<double2*>(p)[1] = make_double2(v[2], v[3]);
}
__device__ __forceinline__ void store2(float* p, float a, float b) {
  *reinterpret_cast<float2*>(p) = make_float2(a, b);
}
__device__ __forceinline__ void store2(double* p, double a, double b) {
  *reinterpret_cast<double2*>(p) = make_double2(a, b);
}

// A row-major matrix [rows, ld] read as an operand whose rows are the tile rows.
template <typename In>
struct DenseLoader {
  using Acc = typename AccOf<In>::type;
  struct Col {
    int64_t pp;
  };
  const In* x;  // [rows, ld]
  int64_t ld;

  __device__ __forceinline__ Col column(int64_t pp) const { return {pp}; }
  __device__ __forceinline__ Acc load(int64_t i, const Col& col) const { return to_acc(x[i * ld + col.pp]); }
};

// Micro-tile coordinates of thread tid.
__device__ __forceinline__ int micro_tx(int tid) { return tid % (kBN / 4); }
__device__ __forceinline__ int micro_ty(int tid) { return tid / (kBN / 4); }

// What thread tid stages of a transposed tile: columns kk_lo + 8·h, rows m_lo + 32·h. A warp covers
// 8 consecutive kk × 4 consecutive m, so the transposed stores hit 32 distinct banks (row stride
// kBM + 4) and the global reads are 4 row segments of 8 elements.
struct LoadLane {
  int kk_lo;  // in [0, 8)
  int m_lo;   // in [0, 32)
};
__device__ __forceinline__ LoadLane load_lane(int tid) { return {tid & 7, tid >> 3}; }

// Ts[kk][m] = source[row0 + m, col0 + kk] for m < kBM, kk < kBK; zeros outside [0, rows) × [0, cols).
// The caller synchronizes before Ts is read (and before it is overwritten again).
template <class Loader>
__device__ __forceinline__ void load_tile_transposed(const Loader& loader, typename Loader::Acc (&Ts)[kBK][kLdT],
                                                     int64_t row0, int64_t rows, int64_t col0, int64_t cols,
                                                     LoadLane lane) {
  using Acc = typename Loader::Acc;
  const int kk_lo = lane.kk_lo, m_lo = lane.m_lo;
#pragma unroll
  for (int kh = 0; kh < kBK / 8; ++kh) {
    const int kk = kh * 8 + kk_lo;
    const int64_t pp = col0 + kk;
    const bool col_ok = pp < cols;
    const typename Loader::Col col = loader.column(col_ok ? pp : 0);
#pragma unroll
    for (int mh = 0; mh < kBM / 32; ++mh) {
      const int m = m_lo + 32 * mh;
      const int64_t i = row0 + m;
      Ts[kk][m] = (col_ok && i < rows) ? loader.load(i, col) : Acc(0);
    }
  }
}

template <typename Acc>
__device__ __forceinline__ void zero_micro_tile(Acc (&acc)[4][4]) {
#pragma unroll
  for (int r = 0; r < 4; ++r)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[r][c] = Acc(0);
}

// acc[r][c] += Σ_kk As[kk][4ty + r] · Bs[kk][4tx + c], kk ascending (a fixed order).
template <typename Acc, int kLdA, int kLdB>
__device__ __forceinline__ void multiply_micro_tile(const Acc (&As)[kBK][kLdA], const Acc (&Bs)[kBK][kLdB], int tx,
                                                    int ty, Acc (&acc)[4][4]) {
  static_assert(kLdA >= kBM && kLdB >= kBN && kLdA % 4 == 0 && kLdB % 4 == 0, "aligned 4-element loads");
#pragma unroll
  for (int kk = 0; kk < kBK; ++kk) {
    Acc x[4], w[4];
    load4(&As[kk][4 * ty], x);
    load4(&Bs[kk][4 * tx], w);
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[r][c] += x[r] * w[c];
  }
}

// dst[i, j] = acc for the in-bounds part (i < rows, j < cols) of the micro-tile at (m0, n0) of a
// row-major [rows, cols] output.
template <typename Acc>
__device__ __forceinline__ void store_micro_tile(const Acc (&acc)[4][4], Acc* dst, int64_t m0, int64_t n0,
                                                 int64_t rows, int64_t cols, int tx, int ty) {
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int64_t i = m0 + 4 * ty + r;
    if (i >= rows) continue;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int64_t j = n0 + 4 * tx + c;
      if (j < cols) dst[i * cols + j] = acc[r][c];
    }
  }
}

// out[e] = Σ_{z = 0 .. splits-1} partial[z·nk + e], always in that order (deterministic).
template <typename Acc>
__global__ void reduce_splits_kernel(const Acc* __restrict__ partial, Acc* __restrict__ out, int64_t nk,
                                     int64_t splits) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < nk;
       e += int64_t(gridDim.x) * blockDim.x) {
    Acc sum = partial[e];
    for (int64_t z = 1; z < splits; ++z) sum += partial[z * nk + e];
    out[e] = sum;
  }
}

// Frees a stream-ordered allocation on every exit path (also when a later check throws).
struct AsyncBuffer {
  void* ptr = nullptr;
  cudaStream_t stream = nullptr;
  ~AsyncBuffer() {
    if (ptr) cudaFreeAsync(ptr, stream);
  }
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Split-K plan for `tiles` output tiles and `k_tiles` K-steps (>= 1): split z covers the K-steps
// [z·kt_per_split, min(k_tiles, (z+1)·kt_per_split)); no split is empty; splits <= kTargetBlocks.
struct SplitPlan {
  int64_t splits;
  int64_t kt_per_split;
};
inline SplitPlan plan_splits(int64_t tiles, int64_t k_tiles) {
  int64_t splits = 1;
  if (tiles < kTargetBlocks) {
    splits = ceil_div(kTargetBlocks, tiles);
    const int64_t most = ceil_div(k_tiles, kMinKTilesPerSplit);
    if (splits > most) splits = most;
    if (splits < 1) splits = 1;
  }
  const int64_t kt_per_split = ceil_div(k_tiles, splits);
  splits = ceil_div(k_tiles, kt_per_split);  // no empty split; still <= kTargetBlocks
  return {splits, kt_per_split};
}

// Where the GEMM kernel writes: `out` itself for one split, else a scratch buffer of splits
// [rows, cols] slices (allocated on `stream`, owned by `scratch`).
template <typename Acc>
Acc* split_target(AsyncBuffer& scratch, Acc* out, int64_t splits, int64_t rows, int64_t cols, cudaStream_t stream,
                  const char* what) {
  if (splits <= 1) return out;
  scratch.stream = stream;
  check(cudaMallocAsync(&scratch.ptr, sizeof(Acc) * size_t(splits) * size_t(rows) * size_t(cols), stream), what);
  return static_cast<Acc*>(scratch.ptr);
}

// After the GEMM kernel: sums the split slices into out (nothing to do for one split).
template <typename Acc>
void reduce_splits(const Acc* target, Acc* out, int64_t rows, int64_t cols, int64_t splits, cudaStream_t stream,
                   const char* what) {
  if (splits <= 1) return;
  const int64_t nk = rows * cols;
  reduce_splits_kernel<Acc><<<grid_for(nk, 256), 256, 0, stream>>>(target, out, nk, splits);
  check(cudaGetLastError(), what);
}

}  // namespace
}  // namespace fimoda::cuda
