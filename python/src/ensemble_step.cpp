// Bindings of ensemble_step (cpu and cuda): raw addresses; the 8 hyperparameters as a list of floats;
// see fimoda_kernels/ops/ensemble_step.py.
#include <pybind11/stl.h>

#include <stdexcept>
#include <vector>

#include "bindings.h"
#include "fimoda/cpu.h"
#ifdef FIMODA_WITH_CUDA
#include "fimoda/cuda.h"
#endif

namespace {

std::vector<double> hyper(const std::vector<double>& hp) {
  if (hp.size() != 8) throw std::invalid_argument("ensemble_step: expected 8 hyperparameters");
  return hp;
}

}  // namespace

void init_ensemble_step(py::module_& m) {
  m.def("ensemble_step_cpu", [](std::uintptr_t params, std::uintptr_t grads, std::uintptr_t state1,
                                std::uintptr_t state2, std::uintptr_t coef, std::vector<int64_t> segments, int64_t M,
                                bool is_double, int optimizer, std::vector<double> hp) {
    const std::vector<double> h = hyper(hp);
    py::gil_scoped_release release;
    const auto n = int64_t(segments.size());
    if (is_double) {
      fimoda::cpu::ensemble_step<double>(ptr<double>(params), ptr<const double>(grads), ptr<double>(state1),
                                         ptr<double>(state2), ptr<const double>(coef), segments.data(), n, M,
                                         optimizer, h.data());
    } else {
      fimoda::cpu::ensemble_step<float>(ptr<float>(params), ptr<const float>(grads), ptr<float>(state1),
                                        ptr<float>(state2), ptr<const double>(coef), segments.data(), n, M,
                                        optimizer, h.data());
    }
  }, "one SGD/Adam/AdamW step of M models in place (fimoda_kernels/ops/ensemble_step.py)");
#ifdef FIMODA_WITH_CUDA
  m.def("ensemble_step_cuda", [](std::uintptr_t params, std::uintptr_t grads, std::uintptr_t state1,
                                 std::uintptr_t state2, std::uintptr_t coef, std::uintptr_t segments,
                                 int64_t n_segments, int64_t max_segment, int64_t M, bool is_double, int optimizer,
                                 std::vector<double> hp, std::uintptr_t stream) {
    const std::vector<double> h = hyper(hp);
    py::gil_scoped_release release;
    if (is_double) {
      fimoda::cuda::ensemble_step<double>(ptr<double>(params), ptr<const double>(grads), ptr<double>(state1),
                                          ptr<double>(state2), ptr<const double>(coef), ptr<const int64_t>(segments),
                                          n_segments, max_segment, M, optimizer, h.data(), stream);
    } else {
      fimoda::cuda::ensemble_step<float>(ptr<float>(params), ptr<const float>(grads), ptr<float>(state1),
                                         ptr<float>(state2), ptr<const double>(coef), ptr<const int64_t>(segments),
                                         n_segments, max_segment, M, optimizer, h.data(), stream);
    }
  }, "ensemble_step on CUDA pointers (fimoda_kernels/ops/ensemble_step.py)");
#endif
}
