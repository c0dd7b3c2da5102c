// Block widening of the 16-bit float types (bfloat16, float16) to float32 for the CPU kernels'
// reductions, vectorised at run time, and the run-time switch of every vector path (vec.h).
//
// Why: the extension is compiled for baseline x86-64 (SSE2) so that it loads on every x86 CPU.
// There, c10::Half <-> float is a software routine per element and c10::BFloat16 <-> float a
// scalar integer trick, and a bf16/fp16 pass costs more than the fp32 pass that moves twice the
// bytes.  These functions convert a whole block (a few hundred to a few thousand elements) with
// AVX2 + F16C when the running CPU has them (checked once, __builtin_cpu_supports), else with the
// scalar c10 conversions.  The reductions then sum float32 buffers; the update kernels convert
// in registers instead (vec.h's load8 / store8 / round_to).
//
// Widening is exact on both paths (bf16: the 16 bits moved up; fp16: F16C's vcvtph2ps, which
// quiets a signalling NaN as c10's software routine does); tests/test_cpu_vector.py checks every
// bf16 and fp16 bit pattern against the scalar path.
// FUSED_ADV_CPU_VECTOR=0 in the environment (read once, at the first use) forces the scalar path
// everywhere: the reference the bit-equality tests compare against.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace fused_adv {
namespace cpu {

// dst[i] = float(src[i]) for i < n.
void to_float(const c10::BFloat16* src, float* dst, int64_t n);
void to_float(const c10::Half* src, float* dst, int64_t n);
// Whether the vector path is in use (false: no AVX2/F16C, or FUSED_ADV_CPU_VECTOR=0).
bool vector_convert_enabled();

}  // namespace cpu
}  // namespace fused_adv
