// Block conversions bf16/fp16 <-> float32 (see convert.h): AVX2 + F16C kernels chosen at run time,
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
template <typename T>
void from_float_scalar(const float* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
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

// c10::detail::round_to_nearest_even: NaN -> 0x7FC0, else (u + 0x7FFF + ((u >> 16) & 1)) >> 16.
__attribute__((target("avx2,f16c"))) void float_to_bf16_avx2(const float* src, c10::BFloat16* dst, int64_t n) {
  const __m256i one = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7FFF), qnan = _mm256_set1_epi32(0x7FC0);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(src + i);
    const __m256i u = _mm256_castps_si256(x);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), one);
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, bias)), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, qnan, nan);
    // 8 x u32 (each <= 0xFFFF) -> 8 x u16: pack within 128-bit lanes, then gather the halves
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_castsi256_si128(packed));
  }
  from_float_scalar(src + i, dst + i, n - i);
}

__attribute__((target("avx2,f16c"))) void half_to_float_avx2(const c10::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  }
  to_float_scalar(src + i, dst + i, n - i);
}

// vcvtps2ph rounds to nearest even like c10::detail::fp16_ieee_from_fp32_value; only NaNs differ
// (the instruction keeps the payload's top bits), so NaN lanes get c10's sign | 0x7E00.
__attribute__((target("avx2,f16c"))) void float_to_half_avx2(const float* src, c10::Half* dst, int64_t n) {
  const __m256i sign_mask = _mm256_set1_epi32(static_cast<int>(0x80000000u)), qnan = _mm256_set1_epi32(0x7E00);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(src + i);
    __m128i h = _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT);
    const __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
    if (_mm256_movemask_ps(nan) != 0) {
      const __m256i canon =
          _mm256_or_si256(_mm256_srli_epi32(_mm256_and_si256(_mm256_castps_si256(x), sign_mask), 16), qnan);
      const __m256i wide = _mm256_blendv_epi8(_mm256_cvtepu16_epi32(h), canon, _mm256_castps_si256(nan));
      h = _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(wide, wide), 0xD8));
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
  from_float_scalar(src + i, dst + i, n - i);
}

// x <- float(T(x)) in registers (round_through): bf16 keeps the top 16 bits after c10's rounding
// (a NaN becomes 0x7FC00000); fp16 goes through vcvtps2ph / vcvtph2ps with c10's NaN.
__attribute__((target("avx2,f16c"))) void round_bf16_avx2(float* x, int64_t n) {
  const __m256i one = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7FFF);
  const __m256i top = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u)), qnan = _mm256_set1_epi32(0x7FC00000);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), one);
    __m256i r = _mm256_and_si256(_mm256_add_epi32(u, _mm256_add_epi32(lsb, bias)), top);
    r = _mm256_blendv_epi8(r, qnan, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    _mm256_storeu_ps(x + i, _mm256_castsi256_ps(r));
  }
  for (; i < n; ++i) x[i] = static_cast<float>(static_cast<c10::BFloat16>(x[i]));
}

__attribute__((target("avx2,f16c"))) void round_half_avx2(float* x, int64_t n) {
  const __m256i sign_mask = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  const __m256i qnan = _mm256_set1_epi32(0x7FC00000);  // float(Half(sign | 0x7E00)) = sign | 0x7FC00000
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    __m256 r = _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    const __m256i canon = _mm256_or_si256(_mm256_and_si256(_mm256_castps_si256(v), sign_mask), qnan);
    r = _mm256_blendv_ps(r, _mm256_castsi256_ps(canon), nan);
    _mm256_storeu_ps(x + i, r);
  }
  for (; i < n; ++i) x[i] = static_cast<float>(static_cast<c10::Half>(x[i]));
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

void from_float(const float* src, c10::BFloat16* dst, int64_t n) {
#if defined(FUSED_ADV_X86_VECTOR)
  if (use_vector()) return float_to_bf16_avx2(src, dst, n);
#endif
  from_float_scalar(src, dst, n);
}

void from_float(const float* src, c10::Half* dst, int64_t n) {
#if defined(FUSED_ADV_X86_VECTOR)
  if (use_vector()) return float_to_half_avx2(src, dst, n);
#endif
  from_float_scalar(src, dst, n);
}

template <typename T>
void round_through_scalar(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = static_cast<float>(static_cast<T>(x[i]));
}

void round_through(c10::BFloat16*, float* x, int64_t n) {
#if defined(FUSED_ADV_X86_VECTOR)
  if (use_vector()) return round_bf16_avx2(x, n);
#endif
  round_through_scalar<c10::BFloat16>(x, n);
}

void round_through(c10::Half*, float* x, int64_t n) {
#if defined(FUSED_ADV_X86_VECTOR)
  if (use_vector()) return round_half_avx2(x, n);
#endif
  round_through_scalar<c10::Half>(x, n);
}

}  // namespace cpu
}  // namespace fused_adv
