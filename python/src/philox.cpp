// Bindings of philox4x32: int64 arrays [n, 4] counters, [n, 2] keys -> [n, 4] words.
#include "bindings.h"
#include "fimoda/cpu.h"
#ifdef FIMODA_WITH_CUDA
#include "fimoda/cuda.h"
#endif

void init_philox4x32(py::module_& m) {
  m.def("philox4x32_cpu", [](std::uintptr_t counter, std::uintptr_t key, std::uintptr_t out, int64_t n) {
    py::gil_scoped_release release;
    fimoda::cpu::philox4x32(ptr<const int64_t>(counter), ptr<const int64_t>(key), ptr<int64_t>(out), n);
  });
#ifdef FIMODA_WITH_CUDA
  m.def("philox4x32_cuda", [](std::uintptr_t counter, std::uintptr_t key, std::uintptr_t out, int64_t n,
                              std::uintptr_t stream) {
    py::gil_scoped_release release;
    fimoda::cuda::philox4x32(ptr<const int64_t>(counter), ptr<const int64_t>(key), ptr<int64_t>(out), n,
                             stream);
  });
#endif
}
