// Error handling shared by the CUDA kernels: every failure becomes std::runtime_error, which
// pybind11 turns into a Python RuntimeError with the CUDA error string.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace fimoda::cuda {

inline void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("fimoda_kernels CUDA error in ") + what + ": " +
                             cudaGetErrorString(err));
  }
}

// Called at every entry point: a clear message instead of a launch failure on machines
// without a driver or device (the module itself imports there, cudart is static).
void require_device();

inline cudaStream_t as_stream(std::uintptr_t stream) {
  return reinterpret_cast<cudaStream_t>(stream);
}

// Blocks for a grid-stride loop over n items, capped (the loop covers the rest).
inline unsigned int grid_for(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned int>(blocks < 65535 * 16 ? (blocks > 0 ? blocks : 1) : 65535 * 16);
}

}  // namespace fimoda::cuda
