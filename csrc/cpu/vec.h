// One kernel body, two instruction sets: the CPU kernels' block loops are written once over a
// width W and compiled twice, W = 8 for AVX2 (chosen at run time when the CPU has AVX2 + F16C,
// the switch convert.h already uses) and W = 1, the scalar reference path.
//
// Why: the extension is built for baseline x86-64 so that it loads on every x86 CPU, and there
// the compiler vectorises float loops at most 4 wide, and not at all when a loop holds a
// NaN-propagating max/min (AWP's clamp) or double accumulators (PGD's statistics): a bf16 AWP
// pass then ran at 3 GB/s, slower than the fp32 pass over twice the bytes.  ATen solves the same
// problem by compiling its kernels once per CPU_CAPABILITY; here one body is instantiated inside
// a function carrying __attribute__((target("avx2,f16c"))) and inlined into it (flatten), so the
// W = 8 code is AVX2 code while the rest of the extension stays baseline.
//
// W = 8 math is GNU vector-extension code (8 floats per operation); W = 1 runs the scalar
// element functions of csrc/common/kernel_math.h.  Both round every operation once in IEEE
// float32 (no FMA: -ffp-contract=off, and the AVX2 target does not enable FMA), so the two paths
// give the same bits; tests/test_host_path.py checks it on every bf16/fp16 bit pattern and on
// fp32 specials (FUSED_ADV_CPU_VECTOR=0 selects W = 1).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include <c10/util/BFloat16.h>

#include "cpu/convert.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define FUSED_ADV_VEC8 1  // the W = 8 path exists (x86-64 with GCC/Clang); elsewhere W = 1 only
#endif

// GCC warns that a 32-byte vector passed by value changes the ABI without AVX: these helpers are
// always inlined into the AVX2 wrapper, never called across an ABI boundary.
#pragma GCC diagnostic ignored "-Wpsabi"

#define FUSED_ADV_INLINE inline __attribute__((always_inline))

namespace fused_adv {
namespace cpu {
namespace vec {

template <int W>
struct Vec;
template <>
struct Vec<8> {  // GNU vector extension: 8 x float32 in one AVX register
  typedef float f __attribute__((vector_size(32)));
  typedef int32_t i __attribute__((vector_size(32)));
};
template <>
struct Vec<1> {  // the scalar path: lane loops of plain floats
  typedef float f;
  typedef int32_t i;
};
template <int W>
using vf = typename Vec<W>::f;
template <int W>
using vi = typename Vec<W>::i;

template <int W>
FUSED_ADV_INLINE vf<W> load(const float* p) {
  vf<W> v;
  std::memcpy(&v, p, sizeof(v));  // unaligned load
  return v;
}
template <int W>
FUSED_ADV_INLINE void store(float* p, vf<W> v) {
  std::memcpy(p, &v, sizeof(v));
}
template <int W>
FUSED_ADV_INLINE vf<W> splat(float x) {
  return vf<W>{} + x;
}
template <int W>
FUSED_ADV_INLINE float lane(vf<W> v, int k) {
  if constexpr (W == 1) {
    (void)k;
    return v;
  } else {
    return v[k];
  }
}

// ---- the vector forms of kernel_math.h's host comparisons (same results, lane by lane) -------
// |x|: the sign bit cleared (fabs).
FUSED_ADV_INLINE vf<8> abs_(vf<8> x) {
  return reinterpret_cast<vf<8>>(reinterpret_cast<vi<8>>(x) & 0x7FFFFFFF);
}
// common::nan_max / nan_min on the host: the canonical quiet NaN if either operand is NaN, else
// a > b ? a : b (a < b ? a : b), so equal values (+0, -0) give b.
FUSED_ADV_INLINE vf<8> nan_max(vf<8> a, vf<8> b) {
  const vi<8> nan = (a != a) | (b != b);
  const vf<8> m = a > b ? a : b;
  return nan ? splat<8>(std::numeric_limits<float>::quiet_NaN()) : m;
}
FUSED_ADV_INLINE vf<8> nan_min(vf<8> a, vf<8> b) {
  const vi<8> nan = (a != a) | (b != b);
  const vf<8> m = a < b ? a : b;
  return nan ? splat<8>(std::numeric_limits<float>::quiet_NaN()) : m;
}
// torch.sign as common::sign_of: (0 < g) - (g < 0); sign(NaN) = sign(-0) = 0.
FUSED_ADV_INLINE vf<8> sign_of(vf<8> g) {
  const vf<8> one = splat<8>(1.f), zero = splat<8>(0.f);
  return (g > 0.f ? one : zero) - (g < 0.f ? one : zero);
}

// ---- reductions over 8 double lanes -------------------------------------------------------------
// The fixed combination order of the 8 lanes: results never depend on the thread count.
inline double combine8(const double acc[8]) {
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// Elements per float32 buffer when 16-bit data is widened for a reduction: a multiple of 64, so
// every block but the last keeps the 64-element lane pattern (float(x) is exact: the sum is bit
// for bit that of the 16-bit elements).
constexpr int64_t kWidenBlock = 2048;

// sum_into(v, m, acc) over x[0..n), then combine8: float32 / double data passed as it is,
// bf16 / fp16 widened block by block (convert.h) into a stack buffer.
template <typename T, typename SumInto>
FUSED_ADV_INLINE double sum8(const T* __restrict__ x, int64_t n, const SumInto& sum_into) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    sum_into(x, n, acc);
  } else {
    alignas(64) float buf[kWidenBlock];
    for (int64_t j0 = 0; j0 < n; j0 += kWidenBlock) {
      const int64_t m = std::min(kWidenBlock, n - j0);
      to_float(x + j0, buf, m);
      sum_into(static_cast<const float*>(buf), m, acc);
    }
  }
  return combine8(acc);
}

// ---- bf16 lanes in registers ------------------------------------------------------------------
// With vector-extension integer ops (no intrinsics, so the same code serves any target): widening
// moves the 16 bits up (exact); narrowing is c10's round_to_nearest_even, (u + 0x7FFF + lsb) >> 16,
// with c10's canonical NaN 0x7FC0 (sign dropped), as convert.cpp's block conversions.
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));

FUSED_ADV_INLINE vf<8> load8(const float* p) { return load<8>(p); }
FUSED_ADV_INLINE void store8(float* p, vf<8> v) { store<8>(p, v); }
FUSED_ADV_INLINE vf<8> load8(const c10::BFloat16* p) {
  u16x8 h;
  std::memcpy(&h, p, sizeof(h));
  return reinterpret_cast<vf<8>>(__builtin_convertvector(h, u32x8) << 16);
}
FUSED_ADV_INLINE u32x8 bf16_bits(vf<8> x) {
  const u32x8 u = reinterpret_cast<u32x8>(x);
  const u32x8 r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return reinterpret_cast<u32x8>(x != x) ? u32x8{} + 0x7FC0u : r;
}
FUSED_ADV_INLINE void store8(c10::BFloat16* p, vf<8> v) {
  const u16x8 h = __builtin_convertvector(bf16_bits(v), u16x8);
  std::memcpy(p, &h, sizeof(h));
}
#if defined(FUSED_ADV_VEC8)
// ---- fp16 lanes in registers: F16C ------------------------------------------------------------
// vcvtph2ps widens exactly (and quiets a signalling NaN, as c10's software routine does);
// vcvtps2ph rounds to nearest even like c10::detail::fp16_ieee_from_fp32_value, and NaN lanes get
// c10's sign | 0x7E00.  These carry the AVX2 + F16C target and are deliberately not always_inline
// (GCC inlines a function of that target only into code of the same target, which is what
// run_avx2's flatten does with the W = 8 bodies that call them; W = 8 bodies are instantiated for
// run_avx2 alone, never called from baseline code), and static: where one stays out of line, the
// call is direct (no PLT) and uses the AVX calling convention on both sides.
__attribute__((target("avx2,f16c"))) static inline vf<8> load8(const c10::Half* p) {
  return reinterpret_cast<vf<8>>(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
__attribute__((target("avx2,f16c"))) static inline __m128i half_bits(vf<8> v) {
  const __m256 x = reinterpret_cast<__m256>(v);
  const __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
  __m128i h = _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT);
  if (_mm256_movemask_ps(nan) != 0) {
    const __m256i canon = _mm256_or_si256(
        _mm256_srli_epi32(_mm256_and_si256(_mm256_castps_si256(x), _mm256_set1_epi32(static_cast<int>(0x80000000u))),
                          16),
        _mm256_set1_epi32(0x7E00));
    const __m256i wide = _mm256_blendv_epi8(_mm256_cvtepu16_epi32(h), canon, _mm256_castps_si256(nan));
    h = _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(wide, wide), 0xD8));
  }
  return h;
}
__attribute__((target("avx2,f16c"))) static inline void store8(c10::Half* p, vf<8> v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), half_bits(v));
}
__attribute__((target("avx2,f16c"))) static inline vf<8> round_half(vf<8> v) {
  return reinterpret_cast<vf<8>>(_mm256_cvtph_ps(half_bits(v)));
}
#endif

// x rounded to T's precision and back (T = float: x itself): AWP's and MI-FGSM's box stages.
template <typename T>
FUSED_ADV_INLINE vf<8> round_to(vf<8> x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return reinterpret_cast<vf<8>>(bf16_bits(x) << 16);
  } else {
    static_assert(std::is_same_v<T, c10::Half>, "round_to: float32, bf16 or fp16");
    return round_half(x);
  }
}

// out[k] = f(in[k]...) for k < m: W = 8 runs vec_f on 8 lanes at a time (load8 / store8: float32,
// bf16 or fp16 elements) and scalar_f on the tail; W = 1 runs scalar_f
// (csrc/common's element function, on the elements' own type) on every element.  out may be one
// of the inputs (element k is read before it is written).
template <int W, typename Out, typename VecF, typename ScalarF, typename... In>
FUSED_ADV_INLINE void map(int m, Out* out, const VecF& vec_f, const ScalarF& scalar_f,
                          const In*... in) {
  int k = 0;
  if constexpr (W > 1) {
    static_assert(W == 8, "vector lanes: W = 8");
    for (; k + W <= m; k += W) store8(out + k, vec_f(load8(in + k)...));
  }
  for (; k < m; ++k) out[k] = scalar_f(in[k]...);
}

// ---- choosing the width at run time --------------------------------------------------------
template <typename Body>
__attribute__((noinline)) void run_scalar(const Body& body) {
  body(std::integral_constant<int, 1>{});
}
// flatten: everything the body calls in this translation unit is inlined here and compiled for
// AVX2 (a call left out of line would be baseline code: correct, but slow).
#if defined(FUSED_ADV_VEC8)
template <typename Body>
__attribute__((noinline, flatten, target("avx2,f16c"))) void run_avx2(const Body& body) {
  body(std::integral_constant<int, 8>{});
}
#endif
// body(std::integral_constant<int, W>) with W = 8 on AVX2 + F16C CPUs (unless
// FUSED_ADV_CPU_VECTOR=0), else W = 1.  Called once per chunk: one predictable branch.
template <typename Body>
FUSED_ADV_INLINE void with_width(const Body& body) {
#if defined(FUSED_ADV_VEC8)
  if (vector_convert_enabled()) return run_avx2(body);
#endif
  run_scalar(body);
}

}  // namespace vec
}  // namespace cpu
}  // namespace fused_adv
