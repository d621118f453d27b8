// CPU kernels (csrc/cpu). Plain pointers and sizes; no Python or torch headers.
#pragma once
#include <cstdint>

namespace fimoda::cpu {

// out[i, 0..3] = Philox4x32-10(counter[i, 0..3]; key[i, 0..1]) for i < n. Words held in int64.
void philox4x32(const int64_t* counter, const int64_t* key, int64_t* out, int64_t n);

// Rows [0, rows) of the projection matrix P[row_offset + r, j] (MATH.md §9) into a row-major
// [rows, k] buffer. kind: ProjectionKind. T is float or double (the compute type of Gaussian).
template <typename T>
void projection_matrix(T* out, int64_t rows, int64_t k, uint64_t seed, int kind, uint64_t row_offset,
                       double scale);

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

}  // namespace fimoda::cpu
