// Conv2d input patches in the layout the factored kernels consume (fimoda_kernels/ops/conv_patches.py):
// out[n, oh·Wo + ow, (c·kh + i)·kw + j] = x[n, c, oh·sh − ph + i·dh, ow·sw − pw + j·dw] (0 outside the
// image), plus a last column of ones when bias. torch's unfold writes [N, C·kh·kw, L] and the capture
// needs [N, L, C·kh·kw + 1]: the transposing copy and the bias concatenation cost two more passes over
// the largest activation tensor of a CNN. Here one pass writes each output row contiguously; the reads
// stay within one sample's image (a few KiB to MiB, cache-resident) and follow x's strides, so a
// channels_last input needs no copy. OpenMP over (sample, output row).
#include <algorithm>

#include "fimoda/cpu.h"

namespace fimoda::cpu {

template <typename T>
void conv_patches(const T* x, const int64_t* strides, T* out, int64_t N, int64_t C, int64_t H, int64_t W,
                  int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw,
                  int64_t Ho, int64_t Wo, bool bias) {
  const int64_t xn_stride = strides[0], xc_stride = strides[1], xh_stride = strides[2], xw_stride = strides[3];
  const int64_t d = C * kh * kw, width = d + (bias ? 1 : 0);
#pragma omp parallel for schedule(static) if (N * Ho * Wo * width > 32768)
  for (int64_t t = 0; t < N * Ho; ++t) {
    const int64_t n = t / Ho, oh = t % Ho;
    const T* xn = x + n * xn_stride;
    T* row = out + (n * Ho + oh) * Wo * width;
    for (int64_t ow = 0; ow < Wo; ++ow) {
      T* dst = row + ow * width;
      const int64_t h0 = oh * sh - ph, w0 = ow * sw - pw;
      for (int64_t c = 0; c < C; ++c) {
        const T* xc = xn + c * xc_stride;
        for (int64_t i = 0; i < kh; ++i) {
          const int64_t h = h0 + i * dh;
          T* di = dst + (c * kh + i) * kw;
          if (h < 0 || h >= H) {
            std::fill(di, di + kw, T(0));
            continue;
          }
          const T* xr = xc + h * xh_stride;
          for (int64_t j = 0; j < kw; ++j) {
            const int64_t w = w0 + j * dw;
            di[j] = (w >= 0 && w < W) ? xr[w * xw_stride] : T(0);
          }
        }
      }
      if (bias) dst[d] = T(1);
    }
  }
}

template void conv_patches<float>(const float*, const int64_t*, float*, int64_t, int64_t, int64_t, int64_t,
                                  int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                                  int64_t, bool);
template void conv_patches<double>(const double*, const int64_t*, double*, int64_t, int64_t, int64_t, int64_t,
                                   int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                                   int64_t, bool);

}  // namespace fimoda::cpu
