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

// g·act'(z) from h = act(z): relu/leaky by the sign of h (h > 0 iff z > 0 for slope > 0), tanh 1 − h²,
// sigmoid h(1 − h) — autograd's *_backward formulas with the result as input, NaN h included (relu
// passes g, as threshold_backward's h <= 0 test; leaky scales it, as leaky_relu_backward's h > 0 test).
template <typename T, int kAct>
inline T backward(T g, T h, T slope) {
  if (kAct == kRelu) return h <= T(0) ? T(0) : g;
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
// target_clones needs x86 and ifunc (ELF); elsewhere the baseline build serves.
#if defined(__x86_64__) && defined(__GNUC__) && defined(__ELF__)
#define FIMODA_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FIMODA_CLONES
#endif

template <typename T, int kAct>
FIMODA_CLONES void forward_block(T* z, const T* bias, const T* w, T* out, int64_t rows, int64_t C, T slope) {
  for (int64_t r = 0; r < rows; ++r) {
    T* zr = z + r * C;
    if (bias) {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) zr[c] = forward<T, kAct>(zr[c] + bias[c], slope);
    } else {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) zr[c] = forward<T, kAct>(zr[c], slope);
    }
    if (w) {  // the one-output layer after this one, on the row while it is in L1 (the order of this
              // sum follows the SIMD width: bitwise results are per instruction set)
      T acc = T(0);
#pragma omp simd reduction(+ : acc)
      for (int64_t c = 0; c < C; ++c) acc += zr[c] * w[c];
      out[r] = acc;
    }
  }
}

// rows × n entries at g, h (row stride ld). With u (one value per row) g is written only: its input is
// u[r]·w[c], the one-output next layer's input gradient, and wacc[0..n) gets Σ_r u[r]·h[r, c], that
// layer's weight gradient. acc[0..n) gets the column sums of the new g. acc, u / w / wacc may be null.
template <typename T, int kAct>
FIMODA_CLONES void backward_block(T* g, const T* h, T* acc, const T* u, const T* w, T* wacc, int64_t rows, int64_t ld,
                                  int64_t n, T slope) {
  if (acc) std::fill(acc, acc + n, T(0));
  if (u) std::fill(wacc, wacc + n, T(0));
  for (int64_t r = 0; r < rows; ++r) {
    T* gr = g + r * ld;
    const T* hr = h + r * ld;
    if (u && acc) {
      const T ur = u[r];
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) {
        const T v = backward<T, kAct>(ur * w[c], hr[c], slope);
        gr[c] = v;
        acc[c] += v;
        wacc[c] += ur * hr[c];
      }
    } else if (u) {
      const T ur = u[r];
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) {
        gr[c] = backward<T, kAct>(ur * w[c], hr[c], slope);
        wacc[c] += ur * hr[c];
      }
    } else if (acc) {
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
constexpr int64_t kCols = 256;   // columns per task of the backward with sums

template <typename T, int kAct>
void forward_rows(T* z, const T* bias, const T* w, T* out, int64_t M, int64_t R, int64_t C, T slope) {
  const int64_t blocks = (R + kRows - 1) / kRows;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < M * blocks; ++t) {
    const int64_t m = t / blocks, r0 = (t - m * blocks) * kRows;
    forward_block<T, kAct>(z + (m * R + r0) * C, bias ? bias + m * C : nullptr, w ? w + m * C : nullptr,
                           w ? out + m * R + r0 : nullptr, std::min(kRows, R - r0), C, slope);
  }
}

template <typename T, int kAct>
void backward_rows(T* g, const T* h, T* bias_grad, const T* u, const T* w, T* w_grad, int64_t M, int64_t R,
                   int64_t C, T slope) {
  if (!bias_grad && !u) {
    const int64_t blocks = (M * R + kRows - 1) / kRows;
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < blocks; ++t) {
      const int64_t r0 = t * kRows;
      backward_block<T, kAct>(g + r0 * C, h + r0 * C, nullptr, nullptr, nullptr, nullptr,
                              std::min(kRows, M * R - r0), C, C, slope);
    }
    return;
  }
  // per model and column block, over all rows in order: each column's sums are deterministic
  const int64_t blocks = (C + kCols - 1) / kCols;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < M * blocks; ++t) {
    const int64_t m = t / blocks, c0 = (t - m * blocks) * kCols;
    backward_block<T, kAct>(g + m * R * C + c0, h + m * R * C + c0, bias_grad ? bias_grad + m * C + c0 : nullptr,
                            u ? u + m * R : nullptr, u ? w + m * C + c0 : nullptr, u ? w_grad + m * C + c0 : nullptr,
                            R, C, std::min(kCols, C - c0), slope);
  }
}

}  // namespace

template <typename T>
void bias_act(T* z, const T* bias, const T* out_weight, T* out, int64_t M, int64_t R, int64_t C, int act,
              double slope) {
  switch (act) {
    case kIdentity: return forward_rows<T, kIdentity>(z, bias, out_weight, out, M, R, C, T(slope));
    case kRelu: return forward_rows<T, kRelu>(z, bias, out_weight, out, M, R, C, T(slope));
    case kLeaky: return forward_rows<T, kLeaky>(z, bias, out_weight, out, M, R, C, T(slope));
    default: return;  // validated in Python: tanh / sigmoid forward stay with torch's vectorized math
  }
}

template <typename T>
void bias_act_backward(T* g, const T* h, T* bias_grad, const T* out_grad, const T* out_weight, T* out_weight_grad,
                       int64_t M, int64_t R, int64_t C, int act, double slope) {
#define FIMODA_CASE(A) \
  case A: return backward_rows<T, A>(g, h, bias_grad, out_grad, out_weight, out_weight_grad, M, R, C, T(slope));
  switch (act) {
    FIMODA_CASE(kIdentity)
    FIMODA_CASE(kRelu)
    FIMODA_CASE(kLeaky)
    FIMODA_CASE(kTanh)
    FIMODA_CASE(kSigmoid)
    default: return;
  }
#undef FIMODA_CASE
}

#define FIMODA_INSTANTIATE(T)                                                                                  \
  template void bias_act<T>(T*, const T*, const T*, T*, int64_t, int64_t, int64_t, int, double);               \
  template void bias_act_backward<T>(T*, const T*, T*, const T*, const T*, T*, int64_t, int64_t, int64_t, int, \
                                     double);
FIMODA_INSTANTIATE(float)
FIMODA_INSTANTIATE(double)
#undef FIMODA_INSTANTIATE

}  // namespace fimoda::cpu
