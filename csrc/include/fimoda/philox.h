// Philox4x32-10 (Salmon et al. 2011) and the projection-matrix entries of MATH.md §9.
// Written once as host/device code: the CPU kernels (OpenMP) and the CUDA kernels include it, so
// both backends evaluate the same function bit for bit.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FIMODA_HD __host__ __device__ __forceinline__
#else
#define FIMODA_HD inline
#endif

namespace fimoda {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

enum ProjectionKind : int { kRademacher = 0, kGaussian = 1 };

FIMODA_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  lo = a * b;
  hi = __umulhi(a, b);
#else
  const uint64_t prod = static_cast<uint64_t>(a) * b;
  lo = static_cast<uint32_t>(prod);
  hi = static_cast<uint32_t>(prod >> 32);
#endif
}

// Ten rounds; the key is bumped between rounds (nine bumps).
FIMODA_HD void philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                             uint32_t k1, uint32_t out[4]) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kPhiloxM0, c0, hi0, lo0);
    mulhilo32(kPhiloxM1, c2, hi1, lo1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// Key words of a 64-bit seed, and the two counter words of a 64-bit parameter index.
FIMODA_HD uint32_t lo32(uint64_t x) { return static_cast<uint32_t>(x & 0xffffffffu); }
FIMODA_HD uint32_t hi32(uint64_t x) { return static_cast<uint32_t>(x >> 32); }

// Rademacher sign of one Philox word: +1 when the low bit is 0.
template <typename T>
FIMODA_HD T rademacher_entry(uint32_t w, T scale) {
  return (w & 1u) ? -scale : scale;
}

// Box–Muller of MATH.md §9: u1 = (w_a + 1)·2^-32 ∈ (0, 1], u2 = w_b·2^-32, computed in T.
template <typename T>
FIMODA_HD T gaussian_entry(uint32_t w_a, uint32_t w_b, T scale) {
  const T two_m32 = T(2.3283064365386963e-10);  // 2^-32, exact in float and double
  const T two_pi = T(6.283185307179586);
  using std::cos;
  using std::log;
  using std::sqrt;
  const T u1 = (static_cast<T>(w_a) + T(1)) * two_m32;
  const T u2 = static_cast<T>(w_b) * two_m32;
  return sqrt(T(-2) * log(u1)) * cos(two_pi * u2) * scale;
}

// float (the CUDA kernels; the CPU ones use csrc/cpu/fast_math.h): both factors from the words'
// integer bits, as there and in the Triton kernel, so every entry keeps ~1e-7 relative accuracy.
// Rounding u2 first costs up to 5e-4 relative near the zeros of cos; near 1, u1 = 1 − v·2^-32 rounds
// to 1 (a zero entry) unless ln u1 = log1p(−v·2^-32).
template <>
FIMODA_HD float gaussian_entry<float>(uint32_t w_a, uint32_t w_b, float scale) {
  using std::cos;
  using std::log;
  using std::log1p;
  using std::sin;
  using std::sqrt;
  const uint32_t v = ~w_a;
  const float ln = v < 0x4B000000u ? log1p(float(int32_t(v)) * -2.3283064365386963e-10f)
                                   : log((float(w_a) + 1.0f) * 2.3283064365386963e-10f);
  // cos(2π w_b 2^-32) = cos(q·π/2 + θ): quadrant q and θ = x·π/4, x ∈ [−1, 1), exact from the bits
  const uint32_t t = w_b + 0x20000000u, q = t >> 30;
  const float theta = float(int32_t(t & 0x3FFFFFFFu) - 0x20000000) * 1.862645149230957e-09f * 0.7853981633974483f;
  const float c = (q & 1u) ? sin(theta) : cos(theta);
  return sqrt(-2.0f * ln) * (((q + 1u) & 2u) ? -c : c) * scale;  // q = 1: −sin θ, 2: −cos θ
}

}  // namespace fimoda
