// Bias + activation epilogues of batched Linear layers (fimoda_kernels/ops/bias_act.py): one pass over the
// activations where torch makes two (the bias broadcast, then the activation; the activation's derivative,
// then the bias gradient's sum). The activation is a template parameter, so the inner loops are branch-free
// and vectorize; the bias-gradient sum runs per model over rows in order (deterministic).
#include <algorithm>

#include "fimoda/cpu.h"

namespace fimoda::cpu {
namespace {

enum Act { kIdentity = 0, kRelu = 1, kLeaky = 2, kTanh = 3, kSigmoid = 4 };

// Branch-free forms that vectorize: max/min, and selects whose both sides are computed unconditionally
// (GCC keeps a conditional multiply as a per-element branch under the default -ftrapping-math; that
// mispredicted on half of the entries and measured 20× slower).
template <typename T, int kAct>
inline T forward(T v, T slope) {
  if (kAct == kRelu) return std::max(v, T(0));
  if (kAct == kLeaky) return std::max(v, T(0)) + slope * std::min(v, T(0));
  return v;
}

// g·act'(z) from h = act(z): relu/leaky by the sign of h (h > 0 iff z > 0 for slope > 0; a NaN h gives
// relu 0, as torch's threshold_backward), tanh 1 − h², sigmoid h(1 − h) — autograd's *_backward formulas
// with the result as input.
template <typename T, int kAct>
inline T backward(T g, T h, T slope) {
  if (kAct == kRelu) return h > T(0) ? g : T(0);
  if (kAct == kLeaky) {
    const T gs = g * slope;
    return h > T(0) ? g : gs;
  }
  if (kAct == kTanh) return g * (T(1) - h * h);
  if (kAct == kSigmoid) return g * (h * (T(1) - h));
  return g;
}

// The loops over one block, compiled for AVX-512, AVX2 and the baseline and picked at load time (the
// portable build's SSE2 ran the cache-resident passes of the training step at half torch's speed).
#define FIMODA_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))

template <typename T, int kAct>
FIMODA_CLONES void forward_block(T* z, const T* bias, int64_t rows, int64_t C, T slope) {
  for (int64_t r = 0; r < rows; ++r) {
    T* zr = z + r * C;
    if (bias) {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) zr[c] = forward<T, kAct>(zr[c] + bias[c], slope);
    } else {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) zr[c] = forward<T, kAct>(zr[c], slope);
    }
  }
}

// rows × n entries at g, h (row stride ld); acc[0..n) = the column sums of the new g when not null
template <typename T, int kAct>
FIMODA_CLONES void backward_block(T* g, const T* h, T* acc, int64_t rows, int64_t ld, int64_t n, T slope) {
  if (acc) std::fill(acc, acc + n, T(0));
  for (int64_t r = 0; r < rows; ++r) {
    T* gr = g + r * ld;
    const T* hr = h + r * ld;
    if (acc) {
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) {
        const T v = backward<T, kAct>(gr[c], hr[c], slope);
        gr[c] = v;
        acc[c] += v;
      }
    } else {
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) gr[c] = backward<T, kAct>(gr[c], hr[c], slope);
    }
  }
}

constexpr int64_t kRows = 16;    // rows per task of the forward and of the sum-free backward
constexpr int64_t kCols = 256;   // columns per task of the backward with the bias sum

template <typename T, int kAct>
void forward_rows(T* z, const T* bias, int64_t M, int64_t R, int64_t C, T slope) {
  const int64_t blocks = (R + kRows - 1) / kRows;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < M * blocks; ++t) {
    const int64_t m = t / blocks, r0 = (t - m * blocks) * kRows;
    forward_block<T, kAct>(z + (m * R + r0) * C, bias ? bias + m * C : nullptr, std::min(kRows, R - r0), C, slope);
  }
}

template <typename T, int kAct>
void backward_rows(T* g, const T* h, T* bias_grad, int64_t M, int64_t R, int64_t C, T slope) {
  if (!bias_grad) {
    const int64_t blocks = (M * R + kRows - 1) / kRows;
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < blocks; ++t) {
      const int64_t r0 = t * kRows;
      backward_block<T, kAct>(g + r0 * C, h + r0 * C, nullptr, std::min(kRows, M * R - r0), C, C, slope);
    }
    return;
  }
  // per model and column block, over all rows in order: each column's sum is deterministic
  const int64_t blocks = (C + kCols - 1) / kCols;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < M * blocks; ++t) {
    const int64_t m = t / blocks, c0 = (t - m * blocks) * kCols;
    backward_block<T, kAct>(g + m * R * C + c0, h + m * R * C + c0, bias_grad + m * C + c0, R, C,
                            std::min(kCols, C - c0), slope);
  }
}

}  // namespace

template <typename T>
void bias_act(T* z, const T* bias, int64_t M, int64_t R, int64_t C, int act, double slope) {
  switch (act) {
    case kIdentity: return forward_rows<T, kIdentity>(z, bias, M, R, C, T(slope));
    case kRelu: return forward_rows<T, kRelu>(z, bias, M, R, C, T(slope));
    case kLeaky: return forward_rows<T, kLeaky>(z, bias, M, R, C, T(slope));
    default: return;  // validated in Python: tanh / sigmoid forward stay with torch's vectorized math
  }
}

template <typename T>
void bias_act_backward(T* g, const T* h, T* bias_grad, int64_t M, int64_t R, int64_t C, int act, double slope) {
  switch (act) {
    case kIdentity: return backward_rows<T, kIdentity>(g, h, bias_grad, M, R, C, T(slope));
    case kRelu: return backward_rows<T, kRelu>(g, h, bias_grad, M, R, C, T(slope));
    case kLeaky: return backward_rows<T, kLeaky>(g, h, bias_grad, M, R, C, T(slope));
    case kTanh: return backward_rows<T, kTanh>(g, h, bias_grad, M, R, C, T(slope));
    case kSigmoid: return backward_rows<T, kSigmoid>(g, h, bias_grad, M, R, C, T(slope));
    default: return;
  }
}

template void bias_act<float>(float*, const float*, int64_t, int64_t, int64_t, int, double);
template void bias_act<double>(double*, const double*, int64_t, int64_t, int64_t, int, double);
template void bias_act_backward<float>(float*, const float*, float*, int64_t, int64_t, int64_t, int, double);
template void bias_act_backward<double>(double*, const double*, double*, int64_t, int64_t, int64_t, int, double);

}  // namespace fimoda::cpu
