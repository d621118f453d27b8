// fimoda_kernels._C: registers one init_<op> per op (bindings only, kernels live in csrc/).
#include <string>

#include "bindings.h"
#include "fimoda_build_info.h"
#include "fimoda/cpu.h"
#ifdef FIMODA_WITH_CUDA
#include "fimoda/cuda.h"
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "fimoda_kernels native kernels (CPU/OpenMP and, when built, CUDA)";
#ifdef FIMODA_WITH_CUDA
  m.attr("has_cuda") = true;
  m.def("cuda_device_count", [] {
    std::string why;
    const int n = fimoda::cuda::device_count(&why);
    return py::make_tuple(n, why);
  }, "(number of usable CUDA devices, reason when 0)");
  m.def("cuda_runtime_version", &fimoda::cuda::runtime_version);
#else
  m.attr("has_cuda") = false;
#endif
  m.attr("build_info") = kFimodaBuildInfo;  // JSON written by CMake
  m.def("cpu_num_threads", &fimoda::cpu::num_threads, "OpenMP threads the CPU kernels use");
  m.def("cpu_simd", &fimoda::cpu::philox_block_isa, "instruction set of the CPU Philox kernels");
  init_philox4x32(m);
  init_projection_matrix(m);
  init_project(m);
  init_grad_dot(m);
  init_lissa_update(m);
  init_ekfac(m);
  init_ensemble_step(m);
  init_conv_patches(m);
  init_bias_act(m);
}
