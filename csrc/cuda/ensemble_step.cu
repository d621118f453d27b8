// One optimizer step for M models at once (fimoda_kernels/ops/ensemble_step.py has the layout and the
// formulas). Grid: x strides over one parameter block's (model, tile) pairs, y is the parameter block;
// each thread reads and writes its entries once. A grid over (tiles, models, blocks) would launch
// mostly empty blocks (a bias is one tile of a weight's 64), millions per step for 10⁴ models.
// The optimizer kind and flags are template parameters.
#include "common.cuh"
#include "fimoda/cuda.h"
#include "fimoda/optimizer.h"

namespace fimoda::cuda {
namespace {

struct Hyper {
  double v[8];  // (−lr, momentum, wd, 1 − β1, β2, 1 − β2, eps, 1 − lr·wd)
};

template <typename T, int kOpt, bool kMomentum, bool kDecay>
__global__ void ensemble_step_kernel(T* __restrict__ params, const T* __restrict__ grads, T* __restrict__ s1,
                                     T* __restrict__ s2, const double* __restrict__ coef,
                                     const int64_t* __restrict__ segments, int64_t M, Hyper h) {
  const int64_t j = blockIdx.y;
  int64_t base = 0;
  for (int64_t k = 0; k < j; ++k) base += M * segments[k];
  const int64_t n = segments[j], tiles = (n + blockDim.x - 1) / blockDim.x;
  const T neg_lr = T(h.v[0]), mom = T(h.v[1]), wd = T(h.v[2]), one_m_b1 = T(h.v[3]), b2 = T(h.v[4]),
          one_m_b2 = T(h.v[5]), eps = T(h.v[6]), decay = T(h.v[7]);
  for (int64_t t = blockIdx.x; t < M * tiles; t += gridDim.x) {
    const int64_t m = t / tiles, e = (t - m * tiles) * blockDim.x + threadIdx.x;
    const double* c = coef + 3 * m;
    if (c[0] == 0.0 || e >= n) continue;  // inactive model: untouched
    const bool first = c[1] != 0.0;
    const T neg_step = T(-c[1]), bc2_sqrt = T(c[2]);
    const int64_t i = base + m * n + e;
    T d = grads[i], q = params[i];
    if (kOpt == kSgd) {
      if (kDecay) d = d + wd * q;
      if (kMomentum) {
        d = first ? d : s1[i] * mom + d;
        s1[i] = d;
      }
      params[i] = q + neg_lr * d;
    } else {
      if (kOpt == kAdamW) q = q * decay;
      else if (kDecay) d = d + wd * q;
      const T m1 = s1[i] + one_m_b1 * (d - s1[i]);
      const T v = s2[i] * b2 + one_m_b2 * (d * d);
      const T denom = sqrt(v) / bc2_sqrt + eps;
      s1[i] = m1;
      s2[i] = v;
      params[i] = q + (neg_step * m1) / denom;
    }
  }
}

template <typename T, int kOpt, bool kMomentum, bool kDecay>
void launch(T* params, const T* grads, T* s1, T* s2, const double* coef, const int64_t* segments,
            int64_t n_segments, int64_t max_segment, int64_t M, const Hyper& h, cudaStream_t stream) {
  const int threads = 256;
  // a few waves of blocks per parameter block; each strides over its (model, tile) pairs
  const int64_t pairs = M * ((max_segment + threads - 1) / threads);
  const dim3 grid(unsigned(pairs < 1024 ? pairs : 1024), unsigned(n_segments));
  ensemble_step_kernel<T, kOpt, kMomentum, kDecay><<<grid, threads, 0, stream>>>(params, grads, s1, s2, coef,
                                                                                  segments, M, h);
}

template <typename T, int kOpt>
void launch_flags(T* params, const T* grads, T* s1, T* s2, const double* coef, const int64_t* segments,
                  int64_t n_segments, int64_t max_segment, int64_t M, const Hyper& h, cudaStream_t stream) {
  const bool momentum = h.v[1] != 0.0, decay = h.v[2] != 0.0;
  if (momentum && decay)
    launch<T, kOpt, true, true>(params, grads, s1, s2, coef, segments, n_segments, max_segment, M, h, stream);
  else if (momentum)
    launch<T, kOpt, true, false>(params, grads, s1, s2, coef, segments, n_segments, max_segment, M, h, stream);
  else if (decay)
    launch<T, kOpt, false, true>(params, grads, s1, s2, coef, segments, n_segments, max_segment, M, h, stream);
  else
    launch<T, kOpt, false, false>(params, grads, s1, s2, coef, segments, n_segments, max_segment, M, h, stream);
}

}  // namespace

template <typename T>
void ensemble_step(T* params, const T* grads, T* state1, T* state2, const double* coef, const int64_t* segments,
                   int64_t n_segments, int64_t max_segment, int64_t M, int optimizer, const double* hp,
                   std::uintptr_t stream) {
  require_device();
  if (M == 0 || n_segments == 0 || max_segment == 0) return;
  if (n_segments > 65535) throw std::runtime_error("ensemble_step: at most 65535 parameter blocks");
  Hyper h;
  for (int k = 0; k < 8; ++k) h.v[k] = hp[k];
  const cudaStream_t s = as_stream(stream);
  if (optimizer == kSgd)
    launch_flags<T, kSgd>(params, grads, state1, state2, coef, segments, n_segments, max_segment, M, h, s);
  else if (optimizer == kAdam)
    launch_flags<T, kAdam>(params, grads, state1, state2, coef, segments, n_segments, max_segment, M, h, s);
  else
    launch_flags<T, kAdamW>(params, grads, state1, state2, coef, segments, n_segments, max_segment, M, h, s);
  check(cudaGetLastError(), "ensemble_step launch");
}

template void ensemble_step<float>(float*, const float*, float*, float*, const double*, const int64_t*, int64_t,
                                   int64_t, int64_t, int, const double*, std::uintptr_t);
template void ensemble_step<double>(double*, const double*, double*, double*, const double*, const int64_t*,
                                    int64_t, int64_t, int64_t, int, const double*, std::uintptr_t);

}  // namespace fimoda::cuda
