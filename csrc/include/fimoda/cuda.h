// CUDA kernels (csrc/cuda). Plain device pointers, sizes and the stream as an integer; no torch.
// Every entry point throws std::runtime_error (RuntimeError in Python) when no device is usable.
#pragma once
#include <cstdint>
#include <string>

namespace fimoda::cuda {

// Number of usable devices; 0 with the reason in *why when the driver or device is missing.
int device_count(std::string* why);
std::string runtime_version();

void philox4x32(const int64_t* counter, const int64_t* key, int64_t* out, int64_t n,
                std::uintptr_t stream);

template <typename T>
void projection_matrix(T* out, int64_t rows, int64_t k, uint64_t seed, int kind, uint64_t row_offset,
                       double scale, std::uintptr_t stream);

// Unscaled Rademacher P[row_offset : row_offset + rows, :k] as bfloat16 bit patterns (±1 exact), out
// [rows, k] contiguous: projection_matrix's entries without the float32 tile and its conversion.
void rademacher_bf16(uint16_t* out, int64_t rows, int64_t k, uint64_t seed, uint64_t row_offset,
                     std::uintptr_t stream);

// out[n, k] = grads[n, p] @ P[row_offset : row_offset + p, :k] (MATH.md §9, P as projection_matrix's).
// grads contiguous, dtype 0 float32, 1 float16, 2 bfloat16, 3 float64; out float32 (float64 for
// dtype 3), overwritten; fp32 accumulation (fp64 for dtype 3); deterministic (no atomics).
void project(const void* grads, int dtype, void* out, int64_t n, int64_t p, int64_t k, uint64_t seed,
             int kind, uint64_t row_offset, double scale, std::uintptr_t stream);

// project of each sample's Linear gradient [W.flatten(), b] with W_i = Σ_t s_{i,t} a_{i,t}ᵀ (indices
// row_offset + o·d_in + c) and, when bias, b_i = Σ_t s_{i,t} (row_offset + d_out·d_in + o); a [n, T, d_in]
// and s [n, T, d_out] contiguous, same dtype codes as project. The gradient is never stored.
void project_linear(const void* a, const void* s, int dtype, void* out, int64_t n, int64_t T, int64_t d_in,
                    int64_t d_out, bool bias, int64_t k, uint64_t seed, int kind, uint64_t row_offset,
                    double scale, std::uintptr_t stream);

// The operand split of project's tensor-core path: for each element x of src [rows, cols] (row stride
// ld; dtype 0 float32, 1 float16) writes parts (1..3) bfloat16 values dst[q, i, j] (dst [parts, rows,
// cols] contiguous) with part_0 = bf16(x), part_q = bf16(x − Σ_{r<q} part_r): three parts hold every
// float32 to 2^-24 relative, two every float16 exactly, so bfloat16 GEMMs with float32 accumulation
// over the parts reproduce float32 products.
void split_bf16(const void* src, int dtype, int64_t rows, int64_t cols, int64_t ld, void* dst, int parts,
                std::uintptr_t stream);

// out[n, m] = train[n, d] @ test[m, d]ᵀ (MATH.md §3 Grad-Dot); with normalize divided by
// ‖train_i‖ ‖test_j‖ (Grad-Cos; the norms from the same inputs in the same pass; a zero norm gives 0).
// train, test contiguous, dtype as project; out [n, m] float32 (float64 for dtype 3), overwritten;
// fp32 accumulation (fp64 for dtype 3); deterministic (no atomics).
void grad_dot(const void* train, const void* test, int dtype, void* out, int64_t n, int64_t m, int64_t d,
              bool normalize, std::uintptr_t stream);

// One Linear layer with T = 1 (MATH.md §4): out[i, j] = (a_i·b_j)(s_i·r_j), or out[i, j] += that with
// accumulate. a [n, d_in], s [n, d_out], b [m, d_in], r [m, d_out] contiguous, dtype as project; out
// [n, m] float32 (float64 for dtype 3); no n × m temporaries; deterministic (no atomics).
void grad_dot_factored(const void* a, const void* s, const void* b, const void* r, int dtype, void* out, int64_t n,
                       int64_t m, int64_t d_in, int64_t d_out, bool accumulate, std::uintptr_t stream);

// Fused LiSSA update (MATH.md §5), as fimoda::cpu::lissa_update: out = v + (1 − damping)·h − mh / scale
// for contiguous [r, p] blocks (dtype 0 float32, 3 float64; out may alias an input) and sq_norms[r] =
// ‖out_i‖² (float32 accumulation for float32, float64 for float64). partials: scratch of
// lissa_update_partials(r, p) elements of the accumulation type. Deterministic (no atomics).
int64_t lissa_update_partials(int64_t r, int64_t p);
void lissa_update(const void* h, const void* v, const void* mh, void* out, void* sq_norms, void* partials,
                  int dtype, int64_t r, int64_t p, double scale, double damping, std::uintptr_t stream);
// K-FAC / EK-FAC (MATH.md §6; fimoda_kernels/ops/ekfac.py). Contiguous row-major float32 buffers, or
// float64 with fp64; accumulate into c / L / out (never overwrite); deterministic (no atomics).
// c[dx, dy] += f(x)ᵀ f(y) for x [rows, dx], y [rows, dy], f = square with square; symmetric (x = y):
// upper tiles computed and mirrored.
void ekfac_gram(const void* x, const void* y, void* c, bool fp64, int64_t rows, int64_t dx, int64_t dy, bool symmetric,
                bool square, std::uintptr_t stream);
// L[d_out, d_in] += Σ_i (Σ_t sr[i, t, :] ar[i, t, :]ᵀ)² for sr [n, T, d_out], ar [n, T, d_in].
void ekfac_rotated_square(const void* sr, const void* ar, void* L, bool fp64, int64_t n, int64_t T, int64_t d_out,
                          int64_t d_in, std::uintptr_t stream);
// out[i, z] += Σ_t sr[i, t, :]ᵀ W[z] ar[i, t, :] for sr [n, T, d_out], ar [n, T, d_in], W [m, d_out, d_in], out [n, m].
void ekfac_scores(const void* sr, const void* ar, const void* W, void* out, bool fp64, int64_t n, int64_t T, int64_t m,
                  int64_t d_out, int64_t d_in, std::uintptr_t stream);
// ensemble_step of cpu.h on device pointers; segments a device int64 array of n_segments block sizes
// (max_segment the largest), coef a device [M, 3] float64 table, hp the 8 host scalars.
template <typename T>
void ensemble_step(T* params, const T* grads, T* state1, T* state2, const double* coef, const int64_t* segments,
                   int64_t n_segments, int64_t max_segment, int64_t M, int optimizer, const double* hp,
                   std::uintptr_t stream);

}  // namespace fimoda::cuda
