// Per-call factor and per-element step of the sam ops (SAM / ASAM), shared by csrc/cpu/sam.cpp and
// csrc/cuda/sam.cu (C10_HOST_DEVICE).  The math is fused_adv/_torch/sam.py's, operation for
// operation; see docs/methods.md §11 (SAM).  Built on csrc/common/kernel_math.h (opmath_t and the
// *_rn arithmetic that the compiler may not contract).
#pragma once

#include "common/kernel_math.h"

namespace fused_adv {
namespace common {

struct SamScale {
  float scale;  // rho / (n + 1e-12) as the reference evaluates it: reciprocal, then times rho
  bool ok;      // the global sum of squares is finite (an inf/NaN gradient skips the climb)
};

// `total` is the float32 rounding of the float64 sum of every tensor's sum of squares.
C10_HOST_DEVICE inline SamScale sam_scale(float total, float rho) {
  const bool ok = total <= 3.402823466e+38f;  // false for +inf and NaN (total >= 0 otherwise)
  const float n = sqrt_rn(total);
  return {mul_rn(rcp_rn(add_rn(n, 1e-12f)), rho), ok};
}

// P' = P + ((P*P)*G if ADAPTIVE else G) * scale, in the math type, one rounding to T.
template <bool ADAPTIVE, typename T>
C10_HOST_DEVICE inline T sam_step(T p, T g, opmath_t<T> scale) {
  using M = opmath_t<T>;
  const M pv = static_cast<M>(p);
  const M gv = static_cast<M>(g);
  const M t = ADAPTIVE ? mul_rn(mul_rn(pv, pv), gv) : gv;
  return static_cast<T>(add_rn(pv, mul_rn(t, scale)));
}

// The summand of sam_sumsq: ((|P| if ADAPTIVE else 1) * G), in the math type.
template <bool ADAPTIVE, typename T>
C10_HOST_DEVICE inline opmath_t<T> sam_term(T p, T g) {
  using M = opmath_t<T>;
  return ADAPTIVE ? mul_rn(abs_(static_cast<M>(p)), static_cast<M>(g)) : static_cast<M>(g);
}

}  // namespace common
}  // namespace fused_adv
