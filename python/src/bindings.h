// Helpers shared by the binding files: tensors cross the boundary as raw addresses (ints), so the
// module does not link libtorch and works with any torch build.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>

namespace py = pybind11;

template <typename T>
inline T* ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

void init_philox4x32(py::module_& m);
void init_projection_matrix(py::module_& m);
void init_project(py::module_& m);
void init_grad_dot(py::module_& m);
void init_lissa_update(py::module_& m);
void init_ekfac(py::module_& m);
void init_ensemble_step(py::module_& m);
void init_conv_patches(py::module_& m);
void init_bias_act(py::module_& m);
