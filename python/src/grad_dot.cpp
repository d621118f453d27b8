// Bindings of grad_dot / grad_dot_factored (CUDA): raw addresses, a dtype code (0 float32, 1 float16,
// 2 bfloat16, 3 float64) and the stream as integers; see fimoda_kernels/ops/grad_dot.py.
#include "bindings.h"
#ifdef FIMODA_WITH_CUDA
#include "fimoda/cuda.h"
#endif

void init_grad_dot(py::module_& m) {
#ifdef FIMODA_WITH_CUDA
  m.def("grad_dot_cuda", [](std::uintptr_t train, std::uintptr_t test, int dtype, std::uintptr_t out, int64_t n_train,
                            int64_t m_test, int64_t d, bool normalize, std::uintptr_t stream) {
    py::gil_scoped_release release;
    fimoda::cuda::grad_dot(ptr<const void>(train), ptr<const void>(test), dtype, ptr<void>(out), n_train, m_test, d,
                           normalize, stream);
  }, "out[n, m] = train[n, d] @ test[m, d]ᵀ, optionally / (‖train_i‖ ‖test_j‖) (MATH.md §3)");
  m.def("grad_dot_factored_cuda", [](std::uintptr_t a, std::uintptr_t s, std::uintptr_t b, std::uintptr_t r,
                                     int dtype, std::uintptr_t out, int64_t n_train, int64_t m_test, int64_t d_in,
                                     int64_t d_out, bool accumulate, std::uintptr_t stream) {
    py::gil_scoped_release release;
    fimoda::cuda::grad_dot_factored(ptr<const void>(a), ptr<const void>(s), ptr<const void>(b), ptr<const void>(r),
                                    dtype, ptr<void>(out), n_train, m_test, d_in, d_out, accumulate, stream);
  }, "out[i, j] (+)= (a_i·b_j)(s_i·r_j): one Linear layer's per-sample gradient inner products (MATH.md §4)");
#else
  (void)m;
#endif
}
