// CPU kernels (csrc/cpu). Plain pointers and sizes; no Python or torch headers.
#pragma once
#include <cstdint>

#include "fimoda/optimizer.h"

namespace fimoda::cpu {

// out[i, 0..3] = Philox4x32-10(counter[i, 0..3]; key[i, 0..1]) for i < n. Words held in int64.
void philox4x32(const int64_t* counter, const int64_t* key, int64_t* out, int64_t n);

// Rows [0, rows) and columns [col_begin, col_begin + cols) of the projection matrix
// P[row_offset + r, j] (MATH.md §9) into a row-major [rows, cols] buffer; scale is 1/√k of the whole
// matrix (col_begin + cols <= k < 2^32). kind: ProjectionKind. T is float or double (the compute
// type of Gaussian).
template <typename T>
void projection_matrix(T* out, int64_t rows, int64_t col_begin, int64_t cols, uint64_t seed, int kind,
                       uint64_t row_offset, double scale);

int num_threads();

// Instruction set of the block Philox the CPU kernels use: "avx512", "avx2" or "scalar"
// (FIMODA_SIMD=scalar|avx2|avx512 in the environment forces a lower one).
const char* philox_block_isa();

// Fused LiSSA update (MATH.md §5): out[i, j] = v[i, j] + (1 − damping)·h[i, j] − mh[i, j] / scale for the
// row-major [r, p] blocks h, v, mh, out (T float or double; out may alias any input), and
// sq_norms[i] = Σ_j out[i, j]² accumulated in double, independent of the thread count.
template <typename T>
void lissa_update(const T* h, const T* v, const T* mh, T* out, double* sq_norms, int64_t r, int64_t p,
                  double scale, double damping);
// One SGD/Adam/AdamW step for M models (fimoda_kernels/ops/ensemble_step.py): params, grads, state1,
// state2 (null where unused) hold n_segments blocks, block j a row-major [M, segments[j]] array; coef [M, 3]
// per-model (active, a, b); hp the 8 scalars of ensemble_step.hyperparameters; optimizer an EnsembleOptimizer.
template <typename T>
void ensemble_step(T* params, const T* grads, T* state1, T* state2, const double* coef, const int64_t* segments,
                   int64_t n_segments, int64_t M, int optimizer, const double* hp);

// Conv2d input patches [N, Ho·Wo, C·kh·kw (+1)] of x [N, C, H, W] with element strides strides[0..3]
// (any layout, e.g. channels_last; T float or double):
// out[n, oh·Wo + ow, (c·kh + i)·kw + j] = x[n, c, oh·sh − ph + i·dh, ow·sw − pw + j·dw], 0 outside the
// image (torch's unfold order), then a column of ones when bias.
template <typename T>
void conv_patches(const T* x, const int64_t* strides, T* out, int64_t N, int64_t C, int64_t H, int64_t W,
                  int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw,
                  int64_t Ho, int64_t Wo, bool bias);

// Bias + activation of M stacked layers (fimoda_kernels/ops/bias_act.py), z [M, R, C] and bias [M, C] (or
// null) row-major, T float or double. act: 0 identity, 1 relu, 2 leaky_relu (slope), 3 tanh, 4 sigmoid.
// Forward, in place (acts 0-2): z[m, r, c] ← act(z[m, r, c] + bias[m, c]); with out_weight [M, C] (a
// one-output layer after this one) also out[m, r] = Σ_c z[m, r, c]·out_weight[m, c] (out [M, R]).
template <typename T>
void bias_act(T* z, const T* bias, const T* out_weight, T* out, int64_t M, int64_t R, int64_t C, int act,
              double slope);
// Backward, in place from the output h (acts 0-4): g[m, r, c] ← g[m, r, c]·act'(h[m, r, c]); with out_grad
// [M, R] g's input is out_grad[m, r]·out_weight[m, c] instead (g is written only) and out_weight_grad[m, c] =
// Σ_r out_grad[m, r]·h[m, r, c]. bias_grad[m, c] = Σ_r g[m, r, c] when not null. Sums run per model over r in
// order (independent of the threads and of M).
template <typename T>
void bias_act_backward(T* g, const T* h, T* bias_grad, const T* out_grad, const T* out_weight, T* out_weight_grad,
                       int64_t M, int64_t R, int64_t C, int act, double slope);

}  // namespace fimoda::cpu
