// Bindings of conv_patches (CPU): raw addresses of x [N, C, H, W] (strides in elements, any layout) and a
// contiguous out [N, Ho·Wo, width]; see fimoda_kernels/ops/conv_patches.py.
#include <pybind11/stl.h>

#include <array>

#include "bindings.h"
#include "fimoda/cpu.h"

void init_conv_patches(py::module_& m) {
  m.def("conv_patches_cpu", [](std::uintptr_t x, std::array<int64_t, 4> strides, std::uintptr_t out,
                               bool is_double, int64_t N, int64_t C, int64_t H, int64_t W, int64_t kh, int64_t kw,
                               int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw, int64_t Ho,
                               int64_t Wo, bool bias) {
    py::gil_scoped_release release;
    if (is_double) {
      fimoda::cpu::conv_patches<double>(ptr<const double>(x), strides.data(), ptr<double>(out), N, C, H, W, kh, kw,
                                        sh, sw, ph, pw, dh, dw, Ho, Wo, bias);
    } else {
      fimoda::cpu::conv_patches<float>(ptr<const float>(x), strides.data(), ptr<float>(out), N, C, H, W, kh, kw, sh,
                                       sw, ph, pw, dh, dw, Ho, Wo, bias);
    }
  }, "Conv2d input patches [N, Ho·Wo, C·kh·kw (+1 column of ones)] in one pass");
}
