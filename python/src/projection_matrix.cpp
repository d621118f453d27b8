// Bindings of projection_matrix: fill a row-major float32/float64 buffer ([rows, cols] of P's columns
// [col_begin, col_begin + cols) on the CPU, [rows, k] on CUDA; on CUDA also unscaled Rademacher
// entries as bfloat16).
#include "bindings.h"
#include "fimoda/cpu.h"
#ifdef FIMODA_WITH_CUDA
#include "fimoda/cuda.h"
#endif

void init_projection_matrix(py::module_& m) {
  m.def("projection_matrix_cpu", [](std::uintptr_t out, bool is_double, int64_t rows, int64_t col_begin,
                                    int64_t cols, uint64_t seed, int kind, uint64_t row_offset, double scale) {
    py::gil_scoped_release release;
    if (is_double) {
      fimoda::cpu::projection_matrix<double>(ptr<double>(out), rows, col_begin, cols, seed, kind, row_offset,
                                             scale);
    } else {
      fimoda::cpu::projection_matrix<float>(ptr<float>(out), rows, col_begin, cols, seed, kind, row_offset,
                                            scale);
    }
  });
#ifdef FIMODA_WITH_CUDA
  m.def("projection_matrix_cuda", [](std::uintptr_t out, bool is_double, int64_t rows, int64_t k,
                                     uint64_t seed, int kind, uint64_t row_offset, double scale,
                                     std::uintptr_t stream) {
    py::gil_scoped_release release;
    if (is_double) {
      fimoda::cuda::projection_matrix<double>(ptr<double>(out), rows, k, seed, kind, row_offset, scale,
                                              stream);
    } else {
      fimoda::cuda::projection_matrix<float>(ptr<float>(out), rows, k, seed, kind, row_offset, scale,
                                             stream);
    }
  });
  m.def("rademacher_bf16_cuda", [](std::uintptr_t out, int64_t rows, int64_t k, uint64_t seed,
                                   uint64_t row_offset, std::uintptr_t stream) {
    py::gil_scoped_release release;
    fimoda::cuda::rademacher_bf16(ptr<uint16_t>(out), rows, k, seed, row_offset, stream);
  });
#endif
}
