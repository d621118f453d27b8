// Bindings of bias_act (CPU): raw addresses of contiguous z / g, h [M, R, C], bias / bias_grad / out_weight /
// out_weight_grad [M, C] and out / out_grad [M, R] (0: none); see fimoda_kernels/ops/bias_act.py.
#include "bindings.h"
#include "fimoda/cpu.h"

void init_bias_act(py::module_& m) {
  m.def("bias_act_cpu", [](std::uintptr_t z, std::uintptr_t bias, std::uintptr_t out_weight, std::uintptr_t out,
                           bool is_double, int64_t M, int64_t R, int64_t C, int act, double slope) {
    py::gil_scoped_release release;
    if (is_double) {
      fimoda::cpu::bias_act<double>(ptr<double>(z), ptr<const double>(bias), ptr<const double>(out_weight),
                                    ptr<double>(out), M, R, C, act, slope);
    } else {
      fimoda::cpu::bias_act<float>(ptr<float>(z), ptr<const float>(bias), ptr<const float>(out_weight),
                                   ptr<float>(out), M, R, C, act, slope);
    }
  }, "z <- act(z + bias) in place; out = z @ out_weight per row when out_weight");
  m.def("bias_act_backward_cpu", [](std::uintptr_t g, std::uintptr_t h, std::uintptr_t bias_grad,
                                    std::uintptr_t out_grad, std::uintptr_t out_weight, std::uintptr_t out_weight_grad,
                                    bool is_double, int64_t M, int64_t R, int64_t C, int act, double slope) {
    py::gil_scoped_release release;
    if (is_double) {
      fimoda::cpu::bias_act_backward<double>(ptr<double>(g), ptr<const double>(h), ptr<double>(bias_grad),
                                             ptr<const double>(out_grad), ptr<const double>(out_weight),
                                             ptr<double>(out_weight_grad), M, R, C, act, slope);
    } else {
      fimoda::cpu::bias_act_backward<float>(ptr<float>(g), ptr<const float>(h), ptr<float>(bias_grad),
                                            ptr<const float>(out_grad), ptr<const float>(out_weight),
                                            ptr<float>(out_weight_grad), M, R, C, act, slope);
    }
  }, "g <- g * act'(h) in place (g's input from out_grad x out_weight when given), sums over rows");
}
