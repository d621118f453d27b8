// Float32 Rademacher entries of one whole Philox block, w[word][lane] (philox_simd.h), written in
// the row's order out[4l + q] = (w[q][l] & 1) ? -scale : scale (rademacher_entry, philox.h) with
// AVX-512 or AVX2: the sign bit (w & 1) << 31 is xor-ed into the bits of scale (exactly -scale or
// scale), and the four word vectors (one entry per lane each) are transposed into lane order with
// two-source permutes (AVX-512) or unpack/permute2f128 (AVX2), so each block is stored contiguously.
// Pure bit moves: identical to the scalar loop in fill_row (projection_matrix.cpp), which the
// generic path and the row tail keep.
#pragma once
#include <cstdint>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace fimoda::cpu::radsimd {

#if defined(__x86_64__) && defined(__GNUC__)
template <int N>
__attribute__((target("avx2"))) void rademacher_block_avx2(const uint32_t (&w)[4][N], float scale,
                                                           float* out) {
  static_assert(N % 8 == 0, "block of 8-lane vectors");
  const __m256i s = _mm256_castps_si256(_mm256_set1_ps(scale));
  for (int l = 0; l < N; l += 8) {
    __m256 v[4];
    for (int q = 0; q < 4; ++q) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(&w[q][l]));
      v[q] = _mm256_castsi256_ps(_mm256_xor_si256(_mm256_slli_epi32(x, 31), s));
    }
    // Per 128-bit half i: t0 = a0 b0 a1 b1, t1 = a2 b2 a3 b3, t2 = c0 d0 c1 d1, t3 = c2 d2 c3 d3
    // (lane 4i + j as j); u_j = a_j b_j c_j d_j.
    const __m256 t0 = _mm256_unpacklo_ps(v[0], v[1]), t1 = _mm256_unpackhi_ps(v[0], v[1]);
    const __m256 t2 = _mm256_unpacklo_ps(v[2], v[3]), t3 = _mm256_unpackhi_ps(v[2], v[3]);
    const __m256 u0 = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(t0), _mm256_castps_pd(t2)));
    const __m256 u1 = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(t0), _mm256_castps_pd(t2)));
    const __m256 u2 = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(t1), _mm256_castps_pd(t3)));
    const __m256 u3 = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(t1), _mm256_castps_pd(t3)));
    float* o = out + 4 * l;
    _mm256_storeu_ps(o, _mm256_permute2f128_ps(u0, u1, 0x20));       // lanes 0, 1
    _mm256_storeu_ps(o + 8, _mm256_permute2f128_ps(u2, u3, 0x20));   // lanes 2, 3
    _mm256_storeu_ps(o + 16, _mm256_permute2f128_ps(u0, u1, 0x31));  // lanes 4, 5
    _mm256_storeu_ps(o + 24, _mm256_permute2f128_ps(u2, u3, 0x31));  // lanes 6, 7
  }
}

template <int N>
__attribute__((target("avx512f"))) void rademacher_block_avx512(const uint32_t (&w)[4][N], float scale,
                                                                float* out) {
  static_assert(N % 16 == 0, "block of 16-lane vectors");
  const __m512i s = _mm512_castps_si512(_mm512_set1_ps(scale));
  // Two-source permutes (one shuffle uop each, half as many as unpack + shuffle_f32x4): words
  // a, b -> a0 b0 a1 b1 .. (32-bit), then pairs (a_l b_l), (c_l d_l) -> a_l b_l c_l d_l (64-bit).
  const __m512i lo32 = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi32 = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const __m512i lo64 = _mm512_setr_epi64(0, 8, 1, 9, 2, 10, 3, 11);
  const __m512i hi64 = _mm512_setr_epi64(4, 12, 5, 13, 6, 14, 7, 15);
  for (int l = 0; l < N; l += 16) {
    const __m512i a = _mm512_loadu_si512(&w[0][l]), b = _mm512_loadu_si512(&w[1][l]);
    const __m512i c = _mm512_loadu_si512(&w[2][l]), d = _mm512_loadu_si512(&w[3][l]);
    const __m512i ab0 = _mm512_permutex2var_epi32(a, lo32, b), ab1 = _mm512_permutex2var_epi32(a, hi32, b);
    const __m512i cd0 = _mm512_permutex2var_epi32(c, lo32, d), cd1 = _mm512_permutex2var_epi32(c, hi32, d);
    const __m512i o[4] = {
        _mm512_permutex2var_epi64(ab0, lo64, cd0), _mm512_permutex2var_epi64(ab0, hi64, cd0),
        _mm512_permutex2var_epi64(ab1, lo64, cd1), _mm512_permutex2var_epi64(ab1, hi64, cd1)};
    for (int m = 0; m < 4; ++m)  // lanes l + 4m .. l + 4m + 3; sign bit (w & 1) << 31 into scale
      _mm512_storeu_si512(out + 4 * l + 16 * m, _mm512_xor_si512(_mm512_slli_epi32(o[m], 31), s));
  }
}
#endif

}  // namespace fimoda::cpu::radsimd
