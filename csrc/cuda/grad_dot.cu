// Gradient inner products (MATH.md §3 Grad-Dot / Grad-Cos, §4 the factored "ghost" form) on the
// micro-tile GEMM machinery of tile_gemm.cuh (the one project.cu uses):
//   grad_dot          out[n, m] = train[n, d] · test[m, d]ᵀ, with normalize divided by
//                     ‖train_i‖ ‖test_j‖ (a zero norm gives 0);
//   grad_dot_factored out[i, j] = (a_i·b_j)(s_i·r_j), or += with accumulate (one Linear layer, T = 1).
//
// Tiling: a block of 256 threads computes a 64 × 64 output tile, each thread a 4 × 4 register
// micro-tile (rows 4·ty .. 4·ty+3, columns 4·tx .. 4·tx+3). Both operands are row-major [rows, K]
// matrices whose rows index the output, so per K-step of 32 the block stages the train-side tile as
// As[kk][i] and the test-side tile as Bs[kk][j] (both transposed, load_tile_transposed), then
// __syncthreads, multiplies, __syncthreads. fp32 FMA (fp64 for float64 inputs), no tensor cores.
//
// grad_dot, normalize: the block sees the full d range of its 64 train and 64 test rows, so it also
// accumulates their squared norms from the same shared tiles in the same pass (thread t owns row
// t % 128 of the 128 staged rows, half t / 128 of each K-step's 32 entries; the two halves are added
// in a fixed order at the end). No split-K then.
// grad_dot, no normalize: split-K over d exactly as project.cu (plan from (n, m, d) only, one scratch
// slice per split, fixed-order reduction kernel).
// grad_dot_factored: two accumulator micro-tiles per thread, aa over d_in (a·b) then ss over d_out
// (s·r); the product aa·ss is stored, or added to out by the thread that owns the element. No split
// (the product is not linear in either reduction) and no n × m temporary.
//
// Deterministic: no atomics; every sum has a fixed order that depends only on the shapes.
#include <climits>
#include <stdexcept>
#include <string>

#include "common.cuh"
#include "fimoda/cuda.h"
#include "tile_gemm.cuh"

namespace fimoda::cuda {
namespace {

constexpr int kNormRows = kBM + kBN;  // staged rows whose squared norms a normalize block accumulates
static_assert(kThreads == 2 * kNormRows && kBK % 2 == 0, "two threads per staged row, half a K-step each");

// ---------------------------------------------------------------------------- grad_dot
// Grid: x strides over the tiles_m × tiles_n output tiles (tile = tm · tiles_n + tn); z = split of the
// K-tiles [z·kt_per_split, min(k_tiles, (z+1)·kt_per_split)) (always one split with kNormalize).
// Writes every in-bounds element of its tile to out + z·n·m.
template <typename In, bool kNormalize>
__global__ void __launch_bounds__(kThreads, 2)
grad_dot_kernel(DenseLoader<In> train, DenseLoader<In> test, typename AccOf<In>::type* __restrict__ out,
                int64_t n, int64_t m, int64_t d, int64_t tiles_n, int64_t tiles, int64_t k_tiles,
                int64_t kt_per_split) {
  using Acc = typename AccOf<In>::type;
  __shared__ __align__(16) Acc As[kBK][kLdT];  // train tile, transposed: As[kk][i - m0]
  __shared__ __align__(16) Acc Bs[kBK][kLdT];  // test tile, transposed: Bs[kk][j - n0]
  __shared__ Acc sq_s[2][kNormRows];           // squared-norm partials [half][staged row]

  const int tid = threadIdx.x;
  const int tx = micro_tx(tid), ty = micro_ty(tid);
  const LoadLane lane = load_lane(tid);
  // Norm ownership: staged row q (0..63 train rows in As, 64..127 test rows in Bs), entries
  // kk in [h·kBK/2, (h+1)·kBK/2) of every K-step. A warp reads 32 consecutive words of one kk row.
  const int q = tid % kNormRows, h = tid / kNormRows;
  const bool q_train = q < kBM;
  const int q_col = q_train ? q : q - kBM;

  const int64_t kt_begin = int64_t(blockIdx.z) * kt_per_split;
  const int64_t kt_end = kt_begin + kt_per_split < k_tiles ? kt_begin + kt_per_split : k_tiles;
  Acc* dst = out + int64_t(blockIdx.z) * n * m;

  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {  // uniform per block
    const int64_t tm = tile / tiles_n;
    const int64_t m0 = tm * kBM, n0 = (tile - tm * tiles_n) * kBN;
    Acc acc[4][4];
    zero_micro_tile(acc);
    Acc sq = Acc(0);

    for (int64_t kt = kt_begin; kt < kt_end; ++kt) {
      const int64_t p0 = kt * kBK;
      load_tile_transposed(train, As, m0, n, p0, d, lane);  // zeros outside [0, n) × [0, d)
      load_tile_transposed(test, Bs, n0, m, p0, d, lane);   // zeros outside [0, m) × [0, d)
      __syncthreads();
      multiply_micro_tile(As, Bs, tx, ty, acc);
      if constexpr (kNormalize) {
#pragma unroll
        for (int e = 0; e < kBK / 2; ++e) {
          const int kk = h * (kBK / 2) + e;
          const Acc v = q_train ? As[kk][q_col] : Bs[kk][q_col];
          sq += v * v;
        }
      }
      __syncthreads();  // before the next K-step (or tile) overwrites As, Bs
    }

    if constexpr (kNormalize) {
      sq_s[h][q] = sq;
      __syncthreads();
      Acc norm_i[4], norm_j[4];  // ‖train_i‖, ‖test_j‖ of this thread's rows and columns
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        norm_i[u] = sqrt(sq_s[0][4 * ty + u] + sq_s[1][4 * ty + u]);
        norm_j[u] = sqrt(sq_s[0][kBM + 4 * tx + u] + sq_s[1][kBM + 4 * tx + u]);
      }
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          // (dot / ‖x‖) / ‖y‖: no intermediate overflows where the product of the norms would.
          acc[r][c] = (norm_i[r] > Acc(0) && norm_j[c] > Acc(0)) ? (acc[r][c] / norm_i[r]) / norm_j[c] : Acc(0);
        }
      // Every thread has read sq_s before the next tile overwrites it. (The next tile's K-loop barriers
      // already order this while k_tiles >= 1; kept so the invariant does not rest on that.)
      __syncthreads();
    }
    store_micro_tile(acc, dst, m0, n0, n, m, tx, ty);
  }
}

template <typename In>
void launch_grad_dot(const In* train, const In* test, typename AccOf<In>::type* out, int64_t n, int64_t m, int64_t d,
                     bool normalize, cudaStream_t stream, const char* what) {
  using Acc = typename AccOf<In>::type;
  if (n == 0 || m == 0) return;
  if (d == 0) {  // empty dot products (and zero norms): the output is zero
    check(cudaMemsetAsync(out, 0, sizeof(Acc) * size_t(n) * size_t(m), stream), what);
    return;
  }
  const int64_t tiles_n = ceil_div(m, kBN);
  const int64_t tiles = ceil_div(n, kBM) * tiles_n;
  const int64_t k_tiles = ceil_div(d, kBK);
  // normalize: each block must see the whole d range of its rows (the norms), so no split.
  const SplitPlan plan = normalize ? SplitPlan{1, k_tiles} : plan_splits(tiles, k_tiles);

  AsyncBuffer scratch;
  Acc* target = split_target(scratch, out, plan.splits, n, m, stream, what);
  const dim3 grid(static_cast<unsigned int>(tiles < INT_MAX ? tiles : INT_MAX), 1,
                  static_cast<unsigned int>(plan.splits));
  const DenseLoader<In> tr{train, d}, te{test, d};
  if (normalize) {
    grad_dot_kernel<In, true><<<grid, kThreads, 0, stream>>>(tr, te, target, n, m, d, tiles_n, tiles, k_tiles,
                                                             plan.kt_per_split);
  } else {
    grad_dot_kernel<In, false><<<grid, kThreads, 0, stream>>>(tr, te, target, n, m, d, tiles_n, tiles, k_tiles,
                                                              plan.kt_per_split);
  }
  check(cudaGetLastError(), what);
  reduce_splits(target, out, n, m, plan.splits, stream, what);
}

// ---------------------------------------------------------------------------- grad_dot_factored
// acc = the [kBM, kBN] tile at (m0, n0) of x · yᵀ over d columns (kt K-steps) through the shared
// tiles Xs, Ys; ends with a barrier, so the caller may reuse Xs, Ys at once.
template <typename Loader, typename Acc>
__device__ __forceinline__ void gram_micro_tile(const Loader& x, const Loader& y, Acc (&Xs)[kBK][kLdT],
                                                Acc (&Ys)[kBK][kLdT], int64_t m0, int64_t n0, int64_t n,
                                                int64_t m, int64_t d, int64_t kt, const LoadLane& lane,
                                                int tx, int ty, Acc (&acc)[4][4]) {
  zero_micro_tile(acc);
  for (int64_t t = 0; t < kt; ++t) {
    const int64_t p0 = t * kBK;
    load_tile_transposed(x, Xs, m0, n, p0, d, lane);
    load_tile_transposed(y, Ys, n0, m, p0, d, lane);
    __syncthreads();
    multiply_micro_tile(Xs, Ys, tx, ty, acc);
    __syncthreads();  // before the next K-step (or tile) overwrites Xs, Ys
  }
}

// Grid: x strides over the tiles_m × tiles_n output tiles; each block reduces over all of d_in
// (kt_in K-steps) and d_out (kt_out K-steps) for its tile. out[i, j] is read (accumulate) and written
// only by the thread that owns it.
template <typename In>
__global__ void __launch_bounds__(kThreads, 2)
grad_dot_factored_kernel(DenseLoader<In> a, DenseLoader<In> s, DenseLoader<In> b, DenseLoader<In> r,
                         typename AccOf<In>::type* __restrict__ out, int64_t n, int64_t m, int64_t d_in,
                         int64_t d_out, int64_t tiles_n, int64_t tiles, int64_t kt_in, int64_t kt_out,
                         bool accumulate) {
  using Acc = typename AccOf<In>::type;
  __shared__ __align__(16) Acc As[kBK][kLdT];  // train-side tile (a, then s), transposed
  __shared__ __align__(16) Acc Bs[kBK][kLdT];  // test-side tile (b, then r), transposed

  const int tid = threadIdx.x;
  const int tx = micro_tx(tid), ty = micro_ty(tid);
  const LoadLane lane = load_lane(tid);

  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {  // uniform per block
    const int64_t tm = tile / tiles_n;
    const int64_t m0 = tm * kBM, n0 = (tile - tm * tiles_n) * kBN;

    Acc aa[4][4], ss[4][4];
    gram_micro_tile(a, b, As, Bs, m0, n0, n, m, d_in, kt_in, lane, tx, ty, aa);   // a_i · b_j
    gram_micro_tile(s, r, As, Bs, m0, n0, n, m, d_out, kt_out, lane, tx, ty, ss);  // s_i · r_j

#pragma unroll
    for (int rr = 0; rr < 4; ++rr) {
      const int64_t i = m0 + 4 * ty + rr;
      if (i >= n) continue;
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int64_t j = n0 + 4 * tx + c;
        if (j >= m) continue;
        const Acc v = aa[rr][c] * ss[rr][c];
        Acc* o = out + i * m + j;
        *o = accumulate ? *o + v : v;
      }
    }
  }
}

template <typename In>
void launch_grad_dot_factored(const In* a, const In* s, const In* b, const In* r, typename AccOf<In>::type* out,
                              int64_t n, int64_t m, int64_t d_in, int64_t d_out, bool accumulate,
                              cudaStream_t stream, const char* what) {
  using Acc = typename AccOf<In>::type;
  if (n == 0 || m == 0) return;
  if (d_in == 0 || d_out == 0) {  // an empty factor: this layer contributes zero
    if (!accumulate) check(cudaMemsetAsync(out, 0, sizeof(Acc) * size_t(n) * size_t(m), stream), what);
    return;
  }
  const int64_t tiles_n = ceil_div(m, kBN);
  const int64_t tiles = ceil_div(n, kBM) * tiles_n;
  const dim3 grid(static_cast<unsigned int>(tiles < INT_MAX ? tiles : INT_MAX));
  grad_dot_factored_kernel<In><<<grid, kThreads, 0, stream>>>(
      DenseLoader<In>{a, d_in}, DenseLoader<In>{s, d_out}, DenseLoader<In>{b, d_in}, DenseLoader<In>{r, d_out}, out, n,
      m, d_in, d_out, tiles_n, tiles, ceil_div(d_in, kBK), ceil_div(d_out, kBK), accumulate);
  check(cudaGetLastError(), what);
}

void check_dtype(int dtype, const char* what) {
  if (dtype < 0 || dtype > 3) {
    throw std::invalid_argument(std::string(what) + ": dtype code must be 0 (float32), 1 (float16), "
                                "2 (bfloat16) or 3 (float64), got " + std::to_string(dtype));
  }
}

}  // namespace

void grad_dot(const void* train, const void* test, int dtype, void* out, int64_t n, int64_t m, int64_t d,
              bool normalize, std::uintptr_t stream) {
  require_device();
  const char* what = "grad_dot";
  check_dtype(dtype, what);
  if (n < 0 || m < 0 || d < 0) throw std::invalid_argument("grad_dot: n, m, d must be >= 0");
  const cudaStream_t st = as_stream(stream);
  switch (dtype) {
    case 0:
      launch_grad_dot(static_cast<const float*>(train), static_cast<const float*>(test), static_cast<float*>(out),
                      n, m, d, normalize, st, what);
      break;
    case 1:
      launch_grad_dot(static_cast<const __half*>(train), static_cast<const __half*>(test), static_cast<float*>(out),
                      n, m, d, normalize, st, what);
      break;
    case 2:
      launch_grad_dot(static_cast<const __nv_bfloat16*>(train), static_cast<const __nv_bfloat16*>(test),
                      static_cast<float*>(out), n, m, d, normalize, st, what);
      break;
    default:
      launch_grad_dot(static_cast<const double*>(train), static_cast<const double*>(test),
                      static_cast<double*>(out), n, m, d, normalize, st, what);
      break;
  }
}

void grad_dot_factored(const void* a, const void* s, const void* b, const void* r, int dtype, void* out, int64_t n,
                       int64_t m, int64_t d_in, int64_t d_out, bool accumulate, std::uintptr_t stream) {
  require_device();
  const char* what = "grad_dot_factored";
  check_dtype(dtype, what);
  if (n < 0 || m < 0 || d_in < 0 || d_out < 0) {
    throw std::invalid_argument("grad_dot_factored: n, m, d_in, d_out must be >= 0");
  }
  const cudaStream_t st = as_stream(stream);
  switch (dtype) {
    case 0:
      launch_grad_dot_factored(static_cast<const float*>(a), static_cast<const float*>(s),
                               static_cast<const float*>(b), static_cast<const float*>(r), static_cast<float*>(out),
                               n, m, d_in, d_out, accumulate, st, what);
      break;
    case 1:
      launch_grad_dot_factored(static_cast<const __half*>(a), static_cast<const __half*>(s),
                               static_cast<const __half*>(b), static_cast<const __half*>(r),
                               static_cast<float*>(out), n, m, d_in, d_out, accumulate, st, what);
      break;
    case 2:
      launch_grad_dot_factored(static_cast<const __nv_bfloat16*>(a), static_cast<const __nv_bfloat16*>(s),
                               static_cast<const __nv_bfloat16*>(b), static_cast<const __nv_bfloat16*>(r),
                               static_cast<float*>(out), n, m, d_in, d_out, accumulate, st, what);
      break;
    default:
      launch_grad_dot_factored(static_cast<const double*>(a), static_cast<const double*>(s),
                               static_cast<const double*>(b), static_cast<const double*>(r),
                               static_cast<double*>(out), n, m, d_in, d_out, accumulate, st, what);
      break;
  }
}

}  // namespace fimoda::cuda
