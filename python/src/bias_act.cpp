// Bindings of bias_act (CPU): raw addresses of contiguous z / g, h [M, R, C] and bias / bias_grad [M, C]
// (0: none); see fimoda_kernels/ops/bias_act.py.
#include "bindings.h"
#include "fimoda/cpu.h"

void init_bias_act(py::module_& m) {
  m.def("bias_act_cpu", [](std::uintptr_t z, std::uintptr_t bias, bool is_double, int64_t M, int64_t R, int64_t C,
                           int act, double slope) {
    py::gil_scoped_release release;
    if (is_double) {
      fimoda::cpu::bias_act<double>(ptr<double>(z), ptr<const double>(bias), M, R, C, act, slope);
    } else {
      fimoda::cpu::bias_act<float>(ptr<float>(z), ptr<const float>(bias), M, R, C, act, slope);
    }
  }, "z <- act(z + bias) in place");
  m.def("bias_act_backward_cpu", [](std::uintptr_t g, std::uintptr_t h, std::uintptr_t bias_grad, bool is_double,
                                    int64_t M, int64_t R, int64_t C, int act, double slope) {
    py::gil_scoped_release release;
    if (is_double) {
      fimoda::cpu::bias_act_backward<double>(ptr<double>(g), ptr<const double>(h), ptr<double>(bias_grad), M, R, C,
                                             act, slope);
    } else {
      fimoda::cpu::bias_act_backward<float>(ptr<float>(g), ptr<const float>(h), ptr<float>(bias_grad), M, R, C, act,
                                            slope);
    }
  }, "g <- g * act'(h) in place, bias_grad = sum over rows");
}
