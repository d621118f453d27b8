// Bindings of the K-FAC / EK-FAC kernels (CUDA): raw addresses, fp64 flag, sizes and the stream as
// integers; see fimoda_kernels/ops/ekfac.py (the cpu backend there is torch, not native code).
#include "bindings.h"
#ifdef FIMODA_WITH_CUDA
#include "fimoda/cuda.h"
#endif

void init_ekfac(py::module_& m) {
#ifdef FIMODA_WITH_CUDA
  m.def("ekfac_gram_cuda", [](std::uintptr_t x, std::uintptr_t y, std::uintptr_t c, bool fp64, int64_t rows,
                              int64_t dx, int64_t dy, bool symmetric, bool square, std::uintptr_t stream) {
    py::gil_scoped_release release;
    fimoda::cuda::ekfac_gram(ptr<const void>(x), ptr<const void>(y), ptr<void>(c), fp64, rows, dx, dy, symmetric,
                             square, stream);
  }, "c += f(x)ᵀ f(y) (f = square with square); symmetric: upper tiles mirrored (MATH.md §6)");
  m.def("ekfac_rotated_square_cuda", [](std::uintptr_t sr, std::uintptr_t ar, std::uintptr_t L, bool fp64, int64_t n,
                                        int64_t T, int64_t d_out, int64_t d_in, std::uintptr_t stream) {
    py::gil_scoped_release release;
    fimoda::cuda::ekfac_rotated_square(ptr<const void>(sr), ptr<const void>(ar), ptr<void>(L), fp64, n, T, d_out,
                                       d_in, stream);
  }, "L += Σ_i (Σ_t s̃_t ã_tᵀ)²: the EK-FAC eigenvalue correction for T > 1 (MATH.md §6)");
  m.def("ekfac_scores_cuda", [](std::uintptr_t sr, std::uintptr_t ar, std::uintptr_t W, std::uintptr_t out, bool fp64,
                                int64_t n, int64_t T, int64_t m_test, int64_t d_out, int64_t d_in,
                                std::uintptr_t stream) {
    py::gil_scoped_release release;
    fimoda::cuda::ekfac_scores(ptr<const void>(sr), ptr<const void>(ar), ptr<const void>(W), ptr<void>(out), fp64, n,
                               T, m_test, d_out, d_in, stream);
  }, "out[i, z] += Σ_t s̃_{i,t}ᵀ W_z ã_{i,t}: factored EK-FAC scores (MATH.md §6)");
#else
  (void)m;
#endif
}
