// Block widening bf16/fp16 -> float32 (see convert.h): AVX2 + F16C kernels chosen at run time,
// the scalar c10 conversions otherwise.  No op is registered here.
#include "cpu/convert.h"

#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define FUSED_ADV_X86_VECTOR 1
#endif

namespace fused_adv {
namespace cpu {
namespace {

// ---- scalar path: c10's own conversions, one element at a time -------------------------------
template <typename T>
void to_float_scalar(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

#if defined(FUSED_ADV_X86_VECTOR)
// ---- AVX2 + F16C path: 8 elements per step, scalar c10 tail --------------------------------
__attribute__((target("avx2,f16c"))) void bf16_to_float_avx2(const c10::BFloat16* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    const __m256i w = _mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);
    _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(w));
  }
  to_float_scalar(src + i, dst + i, n - i);
}

__attribute__((target("avx2,f16c"))) void half_to_float_avx2(const c10::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  }
  to_float_scalar(src + i, dst + i, n - i);
}

#endif

bool detect_vector() {
  const char* env = std::getenv("FUSED_ADV_CPU_VECTOR");
  if (env != nullptr && std::strcmp(env, "0") == 0) return false;
#if defined(FUSED_ADV_X86_VECTOR)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

// Decided once (thread-safe static init), then a predictable branch per block.
bool use_vector() {
  static const bool on = detect_vector();
  return on;
}

}  // namespace

bool vector_convert_enabled() { return use_vector(); }

void to_float(const c10::BFloat16* src, float* dst, int64_t n) {
#if defined(FUSED_ADV_X86_VECTOR)
  if (use_vector()) return bf16_to_float_avx2(src, dst, n);
#endif
  to_float_scalar(src, dst, n);
}

void to_float(const c10::Half* src, float* dst, int64_t n) {
#if defined(FUSED_ADV_X86_VECTOR)
  if (use_vector()) return half_to_float_avx2(src, dst, n);
#endif
  to_float_scalar(src, dst, n);
}

}  // namespace cpu
}  // namespace fused_adv
