// Branch-free float32 Box–Muller (MATH.md §9) for the CPU projection kernels: the Gaussian entry
//   sqrt(-2 ln u1) · cos(2π u2) · scale,   u1 = (w_a + 1)·2^-32 ∈ (0, 1],  u2 = w_b·2^-32,
// as plain integer/float arithmetic (no libm calls, no data-dependent branches), so that the loops
// over the lanes of a Philox block vectorize. CPU-only: the CUDA kernels use
// fimoda::gaussian_entry<float> (philox.h: the same integer reductions with the device
// log1pf/logf/sinf/cosf), and float64 outputs keep gaussian_entry<double>.
//
// Both factors start from the Philox words, not from the rounded floats u1 and u2, and are more
// accurate than the formula evaluated in float against the float64 reference:
// - ln u1 = e·ln 2 + ln(1 + f), f ∈ [√½ - 1, √2 - 1], with f obtained exactly in integers and
//   rounded once: near 1, u1 = 1 - v·2^-32 with v = ~w_a (so f = -v·2^-32, e = 0: full relative
//   precision as u1 -> 1, where float(w_a) + 1 rounds to 1 and loses sqrt(-2 ln u1) up to 2.4e-4);
//   elsewhere w_a + 1 = 2^k·(1 + f). ln(1 + f) is the Cephes logf minimax polynomial.
// - cos(2π u2): the quadrant and the remainder come exactly from the integer bits of w_b
//   (w_b + 2^29 = q·2^30 + (r + 2^29)), x = r·2^-29 ∈ [-1, 1) is the angle in units of π/4, and
//   sin(πx/4), cos(πx/4) are minimax polynomials in x, selected and signed by q.
// Accuracy against double std::log/std::cos of the exact u1, u2 (2^24 random entries plus the
// extremes and the branch edges of w_a, w_b): -2 ln u1 within 1.4e-7 relative, cos within 9.2e-8
// absolute; the entry (scale 1) within 7.2e-7 absolute and 2.4e-7·max(|entry|, 1) — rounding the
// exact -2 ln u1 and cos to float32 and doing the same sqrt and product gives 1.8e-7·max(|entry|, 1)
// already. Relative error in norm 4.7e-8 (the formula in float: 3.4e-6).
//
// The results are identical on every instruction set: the code is compiled without floating-point
// contraction (no FMA), and every step is an IEEE-rounded +, -, ×, sqrt or an exact integer
// conversion, so the SSE2, AVX2 and AVX-512 clones below give the same bits.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#if defined(__GNUC__)
#define FIMODA_FAST_INLINE inline __attribute__((always_inline))
#else
#define FIMODA_FAST_INLINE inline
#endif

// No floating-point contraction in this header: the AVX-512 target would otherwise fuse a·b + c
// into FMAs (one rounding instead of two), and the clones would differ in the last bit.
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif

namespace fimoda::cpu::fastmath {

FIMODA_FAST_INLINE float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

FIMODA_FAST_INLINE uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// Bitwise select (c ? a : b) on both values computed unconditionally: no branch for the compiler to
// sink one side's conversions into (which -ftrapping-math then forbids to if-convert).
FIMODA_FAST_INLINE float select(bool c, float a, float b) {
  const uint32_t m = 0u - uint32_t(c);
  return bits_to_float((float_to_bits(a) & m) | (float_to_bits(b) & ~m));
}

// -2 ln u1 for u1 = (w + 1)·2^-32; >= 0 (0 only for w = 2^32 - 1). ln u1 = e·ln 2 + ln(1 + f) with
// f ∈ [√½ - 1, √2 - 1) obtained exactly in integers and rounded once, so ln u1 keeps ~1 ulp
// relative accuracy everywhere, also as u1 -> 1.
FIMODA_FAST_INLINE float neg2_log_u1(uint32_t w) {
  const uint32_t m = w + 1u;  // u1·2^32 (wraps to 0 for w = 2^32 - 1, which takes the near side)
  // Near 1 (u1 > 0.70703): u1 = 1 - v·2^-32 with v = 2^32 - m = ~w < 2^31: e = 0, f = -v·2^-32.
  const uint32_t v = ~w;
  const bool near_one = v < 0x4B000000u;  // f ∈ (-0.29297, 0]
  const float f_near = float(int32_t(v)) * -2.3283064365386963e-10f;
  // Otherwise m = 2^k·(1 + f), k ∈ [0, 31] from the float exponent of m (shifted by √½), and
  // f = (m - 2^k)·2^-k = (m_hi·2^(16-k) - 1) + m_lo·2^-k for m = m_hi·2^16 + m_lo: the first term is
  // exact (Sterbenz; at most 16 significant bits), the second too, so f is rounded once.
  // u1 = 2^(k - 32)·(1 + f).
  const float m_hi = float(int32_t(m >> 16)), m_lo = float(int32_t(m & 0xFFFFu));
  const uint32_t ix = float_to_bits(m_hi * 65536.0f + m_lo) - 0x3F3504F3u;  // float(m); bits of √½
  const int32_t k = int32_t(ix) >> 23;
  const float two_m_k = bits_to_float(uint32_t(127 - k) << 23);  // 2^-k (garbage on the near side)
  const float f_far = (m_hi * (two_m_k * 65536.0f) - 1.0f) + m_lo * two_m_k;
  const float f = select(near_one, f_near, f_far);
  const float e = select(near_one, 0.0f, float(k - 32));
  // Cephes logf: ln(1 + f) = f - f²/2 + f³·P(f), ln 2 split as 0.693359375 - 2.12194440e-4.
  const float z = f * f;
  float p = 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  float y = f * z * p;
  y = y + e * -2.12194440e-4f;
  y = y - 0.5f * z;
  float ln = f + y;
  ln = ln + e * 0.693359375f;
  return ln * -2.0f;
}

// cos(2π·w·2^-32) for any uint32 w.
FIMODA_FAST_INLINE float cos_2pi_u32(uint32_t w) {
  const uint32_t s = w + 0x20000000u;                         // + 1/8 turn: round to the nearest quadrant
  const uint32_t q = s >> 30;                                 // quadrant 0..3
  const int32_t r = int32_t(s & 0x3FFFFFFFu) - 0x20000000;    // [-2^29, 2^29): 2^-32 turns
  const float x = float(r) * 1.862645149230957e-09f;           // 2^-29: θ = x·π/4, x ∈ [-1, 1)
  const float z = x * x;
  // Minimax polynomials in x (fitted for this header; relative error < 4e-9 before rounding):
  // sin(πx/4) = x + x·Q(z), cos(πx/4) = 1 + z·P(z).
  float ps = -3.59504520e-05f;
  ps = ps * z + 2.49000103e-03f;
  ps = ps * z - 8.07454363e-02f;
  ps = ps * z - 2.14601845e-01f;
  const float sin_x = x + x * ps;
  float pc = 3.53133464e-06f;
  pc = pc * z - 3.25942005e-04f;
  pc = pc * z + 1.58543270e-02f;
  pc = pc * z - 3.08425128e-01f;
  const float cos_x = 1.0f + z * pc;
  // cos(qπ/2 + θ): q = 0: cos θ, 1: -sin θ, 2: -cos θ, 3: sin θ.
  const float c = select(q & 1u, sin_x, cos_x);
  return bits_to_float(float_to_bits(c) ^ (((q + 1u) & 2u) << 30));
}

// One float32 Gaussian entry of MATH.md §9 (same association as gaussian_entry: (√·cos)·scale).
inline float gaussian_f32(uint32_t w_a, uint32_t w_b, float scale) {
  return std::sqrt(neg2_log_u1(w_a)) * cos_2pi_u32(w_b) * scale;
}

// ---- Blocks of N Philox calls, w[word][lane]: out[2l + h] = entry(w[2h][l], w[2h + 1][l]), the
// layout of the Gaussian columns (two per call). The lane loops vectorize; the square root is taken
// in a separate pass with the instruction set's own (correctly rounded) sqrt, since the compiler
// does not vectorize libm sqrtf under the default -fmath-errno.

template <int N>
FIMODA_FAST_INLINE void box_muller_parts(const uint32_t (&w)[4][N], float (&r)[2][N], float (&c)[2][N]) {
  for (int h = 0; h < 2; ++h) {
    for (int l = 0; l < N; ++l) r[h][l] = neg2_log_u1(w[2 * h][l]);
    for (int l = 0; l < N; ++l) c[h][l] = cos_2pi_u32(w[2 * h + 1][l]);
  }
}

template <int N>
FIMODA_FAST_INLINE void box_muller_combine(const float (&r)[2][N], const float (&c)[2][N], float scale,
                                           float* out) {
  for (int l = 0; l < N; ++l) {
    out[2 * l] = r[0][l] * c[0][l] * scale;
    out[2 * l + 1] = r[1][l] * c[1][l] * scale;
  }
}

// Baseline: SSE2 sqrtps on x86-64 (the compiler vectorizes the rest 4-wide), std::sqrt elsewhere.
template <int N>
void gaussian_block_generic(const uint32_t (&w)[4][N], float scale, float* out) {
  float r[2][N], c[2][N];
  box_muller_parts(w, r, c);
#if defined(__x86_64__) && defined(__SSE2__)
  static_assert(N % 4 == 0, "block of 4-lane vectors");
  for (int h = 0; h < 2; ++h)
    for (int l = 0; l < N; l += 4) _mm_storeu_ps(&r[h][l], _mm_sqrt_ps(_mm_loadu_ps(&r[h][l])));
#else
  for (int h = 0; h < 2; ++h)
    for (int l = 0; l < N; ++l) r[h][l] = std::sqrt(r[h][l]);
#endif
  box_muller_combine(r, c, scale, out);
}

#if defined(__x86_64__) && defined(__GNUC__)
// The AVX-512 target also enables FMA; contraction is off for this header (above), so this clone
// too rounds every product and sum separately, as the others do.
template <int N>
__attribute__((target("avx2"))) void gaussian_block_avx2(const uint32_t (&w)[4][N], float scale, float* out) {
  static_assert(N % 8 == 0, "block of 8-lane vectors");
  float r[2][N], c[2][N];
  box_muller_parts(w, r, c);
  for (int h = 0; h < 2; ++h)
    for (int l = 0; l < N; l += 8) _mm256_storeu_ps(&r[h][l], _mm256_sqrt_ps(_mm256_loadu_ps(&r[h][l])));
  box_muller_combine(r, c, scale, out);
}

template <int N>
__attribute__((target("avx512f"))) void gaussian_block_avx512(const uint32_t (&w)[4][N], float scale,
                                                              float* out) {
  static_assert(N % 16 == 0, "block of 16-lane vectors");
  float r[2][N], c[2][N];
  box_muller_parts(w, r, c);
  for (int h = 0; h < 2; ++h)
    for (int l = 0; l < N; l += 16) _mm512_storeu_ps(&r[h][l], _mm512_sqrt_ps(_mm512_loadu_ps(&r[h][l])));
  box_muller_combine(r, c, scale, out);
}
#endif

}  // namespace fimoda::cpu::fastmath

#if defined(__clang__)
#pragma STDC FP_CONTRACT DEFAULT
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif
