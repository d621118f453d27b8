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

}  // namespace fimoda::cuda
