// Per-tensor factors and per-element steps of the weight_ext ops (MI-FGSM, the AWP paper's
// perturb/restore), shared by csrc/cpu/weight_ext.cpp and csrc/cuda/weight_ext.cu (C10_HOST_DEVICE).
// The math is fused_adv/_torch/weight_ext.py's, operation for operation; see
// docs/methods.md §2b (MI-FGSM) and §4b (AWP (paper)).  Built on csrc/common/kernel_math.h
// (opmath_t, the *_rn arithmetic that the compiler may not contract, guards, nan_max/nan_min).
#pragma once

#include "common/kernel_math.h"

namespace fused_adv {
namespace common {

// Correctly rounded quotient in the math type (float or double): the reference divides G by its
// norm element by element, and a one-ulp difference in the momentum could flip its sign near 0.
#if defined(__CUDA_ARCH__)
C10_HOST_DEVICE inline float quot_rn(float a, float b) { return __fdiv_rn(a, b); }
C10_HOST_DEVICE inline double quot_rn(double a, double b) { return __ddiv_rn(a, b); }
#else
C10_HOST_DEVICE inline float quot_rn(float a, float b) { return a / b; }
C10_HOST_DEVICE inline double quot_rn(double a, double b) { return a / b; }
#endif

// ---- MI-FGSM (docs/methods.md §2b (MI-FGSM)) -------------------------------------------------
// One element, n = ||G||_1 of the tensor (guard already passed):
//   M' = G/n (first step) or decay*M + G/n, stored in T;  P' = clamp(P + alpha*sign(M'), lo, hi)
// with lo = B - eps and hi = B + eps rounded to T (as the reference computes them in P's dtype);
// the clamp propagates NaN from any operand (torch.clamp with tensor bounds).
// (Two functions, not one returning a struct: the CPU loop then vectorizes.)
template <typename T>
C10_HOST_DEVICE inline T mifgsm_momentum(T g, T m, opmath_t<T> n, opmath_t<T> decay, bool first) {
  using M = opmath_t<T>;
  const M step = quot_rn(static_cast<M>(g), n);
  return static_cast<T>(first ? step : add_rn(mul_rn(decay, static_cast<M>(m)), step));
}

// nan_min(nan_max(v, lo), hi) (kernel_math.h) written as flat selects that GCC if-converts, so the
// CPU loop vectorizes: the same result for every input (ties give the bound, as nan_max/nan_min give
// their second operand), except that a NaN result is v + lo + hi (a NaN; its payload may differ).
template <typename M>
C10_HOST_DEVICE inline M clamp_nan(M v, M lo, M hi) {
  const bool nan = (v != v) | (lo != lo) | (hi != hi);
  M r = v > lo ? v : lo;
  r = r < hi ? r : hi;
  return nan ? v + lo + hi : r;
}

// P' from P, the new (stored) momentum M', and the backup B.
template <typename T>
C10_HOST_DEVICE inline T mifgsm_param(T p, T m_new, T b, opmath_t<T> alpha, opmath_t<T> eps) {
  using M = opmath_t<T>;
  const M v = add_rn(static_cast<M>(p), mul_rn(alpha, sign_of(static_cast<M>(m_new))));
  const M bv = static_cast<M>(b);
  const M lo = static_cast<M>(static_cast<T>(sub_rn(bv, eps)));
  const M hi = static_cast<M>(static_cast<T>(add_rn(bv, eps)));
  return static_cast<T>(clamp_nan(v, lo, hi));
}

// ---- AWP as the paper does it (docs/methods.md §4b (AWP (paper))) ----------------------------
// f = ||W|| / (scale*||D|| + 1e-20) * scale, in float32, in the torch backend's order (no guard:
// a zero D gives f*D = 0, NaN propagates, as the paper's diff_in_weights).
C10_HOST_DEVICE inline float awp_paper_factor(float param_sumsq, float dir_sumsq, float scale) {
  return mul_rn(div_rn(sqrt_rn(param_sumsq), add_rn(mul_rn(scale, sqrt_rn(dir_sumsq)), 1e-20f)), scale);
}

// P + coeff * diff with diff = f*D rounded to T (the paper keeps diff in the weight's dtype).
template <typename T>
C10_HOST_DEVICE inline T awp_paper_step(T p, T d, opmath_t<T> f, opmath_t<T> coeff) {
  using M = opmath_t<T>;
  const T diff = static_cast<T>(mul_rn(static_cast<M>(d), f));
  return static_cast<T>(add_rn(static_cast<M>(p), mul_rn(coeff, static_cast<M>(diff))));
}

}  // namespace common
}  // namespace fused_adv
