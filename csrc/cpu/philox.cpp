// Philox4x32-10 over arrays of counters and keys (the op fimoda_kernels.philox4x32).
#include "fimoda/cpu.h"
#include "fimoda/philox.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace fimoda::cpu {

int num_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

void philox4x32(const int64_t* counter, const int64_t* key, int64_t* out, int64_t n) {
#pragma omp parallel for schedule(static) if (n > 4096)
  for (int64_t i = 0; i < n; ++i) {
    const int64_t* c = counter + 4 * i;
    uint32_t w[4];
    philox4x32_10(uint32_t(c[0]), uint32_t(c[1]), uint32_t(c[2]), uint32_t(c[3]),
                  uint32_t(key[2 * i]), uint32_t(key[2 * i + 1]), w);
    for (int q = 0; q < 4; ++q) out[4 * i + q] = w[q];
  }
}

}  // namespace fimoda::cpu

// ---- run-time choice of the block Philox (philox_simd.h)
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <string>

#include "philox_simd.h"

namespace fimoda::cpu {
namespace {

struct Choice {
  PhiloxBlockFn fn;
  const char* isa;
};

// FIMODA_SIMD=scalar|avx2|avx512 (any case) caps the instruction set; unset, empty or anything else:
// the best this CPU runs (an unknown value must not silently force the slowest path).
const char* forced_isa() {
  const char* env = std::getenv("FIMODA_SIMD");
  if (!env) return nullptr;
  std::string v(env);
  for (char& c : v) c = char(std::tolower(static_cast<unsigned char>(c)));
  for (const char* isa : {"scalar", "avx2", "avx512"})
    if (v == isa) return isa;
  return nullptr;
}

Choice choose() {
  const char* force = forced_isa();
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f"), avx2 = __builtin_cpu_supports("avx2");
  if (avx512 && (!force || !std::strcmp(force, "avx512"))) return {detail::philox_block_avx512, "avx512"};
  if (avx2 && (!force || !std::strcmp(force, "avx2") || !std::strcmp(force, "avx512")))
    return {detail::philox_block_avx2, "avx2"};
#endif
  (void)force;
  return {detail::philox_block_scalar, "scalar"};
}

const Choice& chosen() {
  static const Choice c = choose();
  return c;
}

}  // namespace

PhiloxBlockFn philox_block_impl() { return chosen().fn; }
const char* philox_block_isa() { return chosen().isa; }

}  // namespace fimoda::cpu
