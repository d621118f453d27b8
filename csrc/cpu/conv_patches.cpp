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

// One output position from per-tap source pointers and channel strides (stride 0 on a zero for
// taps in the padding): per channel the kh·kw taps are stored contiguously. K > 0 fixes the tap
// count at compile time (3 × 3 dominates CNNs) so the tap loop unrolls into registers.
template <typename T, int K>
inline void gather_taps(const T* const* p, const int64_t* cs, T* dst, int64_t C, int64_t k_rt) {
  const int64_t k = K > 0 ? K : k_rt;
  for (int64_t c = 0; c < C; ++c) {
    T* dc = dst + c * k;
    for (int64_t t = 0; t < k; ++t) dc[t] = p[t][c * cs[t]];
  }
}

constexpr int64_t kMaxTaps = 121;  // up to 11 × 11 kernels through the tap gather

template <typename T>
void conv_patches(const T* x, const int64_t* strides, T* out, int64_t N, int64_t C, int64_t H, int64_t W,
                  int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw,
                  int64_t Ho, int64_t Wo, bool bias) {
  const int64_t xn_stride = strides[0], xc_stride = strides[1], xh_stride = strides[2], xw_stride = strides[3];
  const int64_t d = C * kh * kw, width = d + (bias ? 1 : 0), taps = kh * kw;
  static const T zero = T(0);
#pragma omp parallel for schedule(static) if (N * Ho * Wo * width > 32768)
  for (int64_t t = 0; t < N * Ho; ++t) {
    const int64_t n = t / Ho, oh = t % Ho;
    const T* xn = x + n * xn_stride;
    T* row = out + (n * Ho + oh) * Wo * width;
    const int64_t h0 = oh * sh - ph;
    const T* p[kMaxTaps];
    int64_t cs[kMaxTaps];
    for (int64_t ow = 0; ow < Wo; ++ow) {
      T* dst = row + ow * width;
      const int64_t w0 = ow * sw - pw;
      if (taps <= kMaxTaps) {
        for (int64_t i = 0; i < kh; ++i) {
          const int64_t h = h0 + i * dh;
          for (int64_t j = 0; j < kw; ++j) {
            const int64_t w = w0 + j * dw;
            const bool inside = h >= 0 && h < H && w >= 0 && w < W;
            p[i * kw + j] = inside ? xn + h * xh_stride + w * xw_stride : &zero;
            cs[i * kw + j] = inside ? xc_stride : 0;
          }
        }
        if (taps == 9) {
          gather_taps<T, 9>(p, cs, dst, C, taps);
        } else {
          gather_taps<T, 0>(p, cs, dst, C, taps);
        }
      } else {
        for (int64_t c = 0; c < C; ++c) {
          for (int64_t i = 0; i < kh; ++i) {
            const int64_t h = h0 + i * dh;
            T* di = dst + (c * kh + i) * kw;
            for (int64_t j = 0; j < kw; ++j) {
              const int64_t w = w0 + j * dw;
              di[j] = (h >= 0 && h < H && w >= 0 && w < W) ? xn[c * xc_stride + h * xh_stride + w * xw_stride]
                                                            : T(0);
            }
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
