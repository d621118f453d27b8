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

}  // namespace fimoda::cuda
