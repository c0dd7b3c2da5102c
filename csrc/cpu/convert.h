// Block conversions between the 16-bit float types (bfloat16, float16) and float32 for the CPU
// kernels, vectorised at run time.
//
// Why: the extension is compiled for baseline x86-64 (SSE2) so that it loads on every x86 CPU.
// There, c10::Half <-> float is a software routine per element and c10::BFloat16 <-> float a
// scalar integer trick, and a bf16/fp16 pass costs more than the fp32 pass that moves twice the
// bytes.  These functions convert a whole block (a few hundred to a few thousand elements) with
// AVX2 + F16C when the running CPU has them (checked once, __builtin_cpu_supports), else with the
// scalar c10 conversions.  The kernels then do their element math on float32 buffers, which the
// compiler vectorises, and store through from_float.
//
// Rounding is c10's, bit for bit, on both paths (tests/test_weight_ops.py checks every bf16 and
// fp16 bit pattern against the scalar path):
//   * widening is exact (bf16: the 16 bits moved up; fp16: F16C's vcvtph2ps, which quiets a
//     signalling NaN as c10's software routine does);
//   * narrowing rounds to nearest even; a NaN becomes c10's canonical NaN (bf16: 0x7FC0, sign
//     dropped; fp16: sign | 0x7E00), not the payload-preserving NaN of the hardware instructions.
// FUSED_ADV_CPU_VECTOR=0 in the environment (read once, at the first conversion) forces the
// scalar path: the reference the bit-equality test compares against.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

namespace fused_adv {
namespace cpu {

// dst[i] = float(src[i]) for i < n.
void to_float(const c10::BFloat16* src, float* dst, int64_t n);
void to_float(const c10::Half* src, float* dst, int64_t n);
// dst[i] = T(src[i]) (round to nearest even, c10's NaN) for i < n.
void from_float(const float* src, c10::BFloat16* dst, int64_t n);
void from_float(const float* src, c10::Half* dst, int64_t n);
// x[i] = float(T(x[i])): rounds float32 values to T's precision in place (AWP's box is computed
// in the parameter's dtype, one rounding per operation).
void round_through(c10::BFloat16*, float* x, int64_t n);
void round_through(c10::Half*, float* x, int64_t n);
// Whether the vector path is in use (false: no AVX2/F16C, or FUSED_ADV_CPU_VECTOR=0).
bool vector_convert_enabled();

// The 16-bit float types whose kernels go through float32 buffers.
template <typename T>
constexpr bool is_low_precision_v = std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;

}  // namespace cpu
}  // namespace fused_adv
