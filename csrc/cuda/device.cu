// Device discovery for the CUDA backend.
#include "common.cuh"
#include "fimoda/cuda.h"

namespace fimoda::cuda {

int device_count(std::string* why) {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error so later calls report afresh
    if (why) *why = cudaGetErrorString(err);
    return 0;
  }
  if (n == 0 && why) *why = "no CUDA device";
  return n;
}

void require_device() {
  std::string why;
  if (device_count(&why) == 0) {
    throw std::runtime_error("fimoda_kernels: no CUDA device available (" + why + ")");
  }
}

std::string runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
}

}  // namespace fimoda::cuda
