// Bindings of project / project_linear (CUDA): raw addresses, a dtype code (0 float32, 1 float16,
// 2 bfloat16, 3 float64) and the stream as integers; see fimoda_kernels/ops/project.py.
#include "bindings.h"
#ifdef FIMODA_WITH_CUDA
#include "fimoda/cuda.h"
#endif

void init_project(py::module_& m) {
#ifdef FIMODA_WITH_CUDA
  m.def("project_cuda", [](std::uintptr_t grads, int dtype, std::uintptr_t out, int64_t n, int64_t p, int64_t k,
                           uint64_t seed, int kind, uint64_t row_offset, double scale, std::uintptr_t stream) {
    py::gil_scoped_release release;
    fimoda::cuda::project(ptr<const void>(grads), dtype, ptr<void>(out), n, p, k, seed, kind, row_offset, scale,
                          stream);
  }, "out[n, k] = grads[n, p] @ P[row_offset : row_offset + p, :k] (MATH.md §9)");
  m.def("project_linear_cuda", [](std::uintptr_t a, std::uintptr_t s, int dtype, std::uintptr_t out, int64_t n,
                                  int64_t T, int64_t d_in, int64_t d_out, bool bias, int64_t k, uint64_t seed,
                                  int kind, uint64_t row_offset, double scale, std::uintptr_t stream) {
    py::gil_scoped_release release;
    fimoda::cuda::project_linear(ptr<const void>(a), ptr<const void>(s), dtype, ptr<void>(out), n, T, d_in,
                                 d_out, bias, k, seed, kind, row_offset, scale, stream);
  }, "projection of per-sample Linear gradients Σ_t s_t a_tᵀ (+ Σ_t s_t) without forming them");
  m.def("split_bf16_cuda", [](std::uintptr_t src, int dtype, int64_t rows, int64_t cols, int64_t ld,
                              std::uintptr_t dst, int parts, std::uintptr_t stream) {
    py::gil_scoped_release release;
    fimoda::cuda::split_bf16(ptr<const void>(src), dtype, rows, cols, ld, ptr<void>(dst), parts, stream);
  }, "dst[q] = bfloat16 parts of src (float32: 3 parts to 2^-24, float16: 2 parts exactly)");
#else
  (void)m;
#endif
}
