// Bindings of lissa_update: raw addresses of contiguous [r, p] blocks; see fimoda_kernels/ops/lissa_update.py.
#include "bindings.h"
#include "fimoda/cpu.h"
#ifdef FIMODA_WITH_CUDA
#include "fimoda/cuda.h"
#endif

void init_lissa_update(py::module_& m) {
  m.def("lissa_update_cpu", [](std::uintptr_t h, std::uintptr_t v, std::uintptr_t mh, std::uintptr_t out,
                               std::uintptr_t sq_norms, bool is_double, int64_t r, int64_t p, double scale,
                               double damping) {
    py::gil_scoped_release release;
    if (is_double) {
      fimoda::cpu::lissa_update<double>(ptr<const double>(h), ptr<const double>(v), ptr<const double>(mh),
                                        ptr<double>(out), ptr<double>(sq_norms), r, p, scale, damping);
    } else {
      fimoda::cpu::lissa_update<float>(ptr<const float>(h), ptr<const float>(v), ptr<const float>(mh),
                                       ptr<float>(out), ptr<double>(sq_norms), r, p, scale, damping);
    }
  }, "out = v + (1 − damping)·h − mh / scale, sq_norms[r] (float64) = ‖out_i‖² (MATH.md §5)");
#ifdef FIMODA_WITH_CUDA
  m.def("lissa_update_cuda_partials", &fimoda::cuda::lissa_update_partials,
        "scratch elements lissa_update_cuda needs for [r, p] blocks");
  m.def("lissa_update_cuda", [](std::uintptr_t h, std::uintptr_t v, std::uintptr_t mh, std::uintptr_t out,
                                std::uintptr_t sq_norms, std::uintptr_t partials, int dtype, int64_t r, int64_t p,
                                double scale, double damping, std::uintptr_t stream) {
    py::gil_scoped_release release;
    fimoda::cuda::lissa_update(ptr<const void>(h), ptr<const void>(v), ptr<const void>(mh), ptr<void>(out),
                               ptr<void>(sq_norms), ptr<void>(partials), dtype, r, p, scale, damping, stream);
  }, "out = v + (1 − damping)·h − mh / scale, sq_norms[r] = ‖out_i‖² (MATH.md §5)");
#endif
}
