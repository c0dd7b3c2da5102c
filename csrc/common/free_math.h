// The per-element step of the `free` op family (the original FreeAT's sign step, docs/methods.md
// §8 (FreeAT and YOPO)), shared by csrc/cpu/free.cpp and csrc/cuda/free.cu (C10_HOST_DEVICE).
// The math is fused_adv/_torch/free.py's, operation for operation; built on
// csrc/common/kernel_math.h (opmath_t, *_rn arithmetic the compiler may not contract, sign_of,
// clamp_keep_nan).
#pragma once

#include "common/kernel_math.h"

namespace fused_adv {
namespace common {

// noise' = clamp(noise + step * sign(g), -clip, clip) in opmath_t<T>, one rounding to T.
// sign is torch.sign (sign(NaN) = sign(-0) = 0); the clamp keeps NaN (torch.clamp).
template <typename T>
C10_HOST_DEVICE inline T freeat_step(T n, T g, opmath_t<T> step, opmath_t<T> clip) {
  using M = opmath_t<T>;
  const M v = add_rn(static_cast<M>(n), mul_rn(step, sign_of(static_cast<M>(g))));
  return static_cast<T>(clamp_keep_nan(v, -clip, clip));
}

}  // namespace common
}  // namespace fused_adv
