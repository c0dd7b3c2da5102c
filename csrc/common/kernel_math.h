// The per-tensor and per-element math shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) kernels:
// one definition, compiled for the host by both and for the device by nvcc, as ATen's
// native/Lerp.h serves its CPU and CUDA kernels.  fused_adv/_torch/*.py states the same math in
// PyTorch (the executable statement every backend follows); this header is its C++ form.
//
// Naming scheme, the same in C++, CUDA and Triton (fused_adv/_triton/kernel_math.py):
//   opmath_t<T>         element math type: float for half/bfloat16/float, double for double
//                       (Triton: the ACC / KIND-derived math dtype)
//   kChunkSize          elements per chunk of a multi-tensor or per-sample pass
//                       (Triton / Python: CHUNK_SIZE); other constants kCamelCase / UPPER_CASE
//   nan_max / nan_min   NaN-propagating max / min (torch.maximum / torch.minimum)
//   norm_ok             the zero/NaN guard of every norm-scaled step
//   *_factors           per-tensor float32 factors of one method, with its guard
//   *_step              one element's update of one method
//   rows_of / last_dim  row view of a [..., H] tensor (csrc/common/checks.h, host only)
//
// Rounding: every multiply, add and divide below rounds once (mul_rn / add_rn / ... are the
// __f*_rn intrinsics on the device and plain operators on the host, where the extension is built
// with -ffp-contract=off), so the host and the device give the same bits: no FMA contraction.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>

#include <cmath>
#include <limits>

namespace fused_adv {
namespace common {

template <typename T>
using opmath_t = at::opmath_type<T>;  // float for half/bfloat16/float, double for double

// ---- correctly rounded arithmetic that the compiler may not fuse ---------------------------
#if defined(__CUDA_ARCH__)
C10_HOST_DEVICE inline float mul_rn(float a, float b) { return __fmul_rn(a, b); }
C10_HOST_DEVICE inline double mul_rn(double a, double b) { return __dmul_rn(a, b); }
C10_HOST_DEVICE inline float add_rn(float a, float b) { return __fadd_rn(a, b); }
C10_HOST_DEVICE inline double add_rn(double a, double b) { return __dadd_rn(a, b); }
C10_HOST_DEVICE inline float sub_rn(float a, float b) { return __fsub_rn(a, b); }
C10_HOST_DEVICE inline double sub_rn(double a, double b) { return __dsub_rn(a, b); }
C10_HOST_DEVICE inline float div_rn(float a, float b) { return __fdiv_rn(a, b); }
C10_HOST_DEVICE inline float rcp_rn(float a) { return __frcp_rn(a); }
#else
C10_HOST_DEVICE inline float mul_rn(float a, float b) { return a * b; }
C10_HOST_DEVICE inline double mul_rn(double a, double b) { return a * b; }
C10_HOST_DEVICE inline float add_rn(float a, float b) { return a + b; }
C10_HOST_DEVICE inline double add_rn(double a, double b) { return a + b; }
C10_HOST_DEVICE inline float sub_rn(float a, float b) { return a - b; }
C10_HOST_DEVICE inline double sub_rn(double a, double b) { return a - b; }
C10_HOST_DEVICE inline float div_rn(float a, float b) { return a / b; }
C10_HOST_DEVICE inline float rcp_rn(float a) { return 1.f / a; }
#endif
// IEEE square root (correctly rounded on both sides: nvcc's default -prec-sqrt=true).
C10_HOST_DEVICE inline float sqrt_rn(float a) { return ::sqrtf(a); }
// |x| with the sign bit cleared (fabs: |-0| = +0, NaN keeps its payload).
C10_HOST_DEVICE inline float abs_(float a) { return ::fabsf(a); }
C10_HOST_DEVICE inline double abs_(double a) { return ::fabs(a); }

// ---- guards and NaN-propagating comparisons ------------------------------------------------
// NaN-propagating max / min (torch.maximum / torch.minimum, unlike std::max): a NaN operand gives
// NaN.  Which NaN is ATen's own choice on each side: on the device the NaN operand itself (ATen's
// CUDA maximum), on the host the canonical quiet NaN (ATen's scalar CPU maximum), so both
// backends keep the exact bits they have always produced.  Equal values (+0, -0) give b.
template <typename M>
C10_HOST_DEVICE inline M nan_max(M a, M b) {
#if defined(__CUDA_ARCH__)
  return (a != a) ? a : (b != b) ? b : (a > b ? a : b);
#else
  return (a != a || b != b) ? std::numeric_limits<M>::quiet_NaN() : (a > b ? a : b);
#endif
}
template <typename M>
C10_HOST_DEVICE inline M nan_min(M a, M b) {
#if defined(__CUDA_ARCH__)
  return (a != a) ? a : (b != b) ? b : (a < b ? a : b);
#else
  return (a != a || b != b) ? std::numeric_limits<M>::quiet_NaN() : (a < b ? a : b);
#endif
}

// torch.clamp(v, lo, hi): NaN stays NaN (every comparison with it is false).
template <typename M>
C10_HOST_DEVICE inline M clamp_keep_nan(M v, M lo, M hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// The zero/NaN guard of every norm-scaled step: n != 0 and n is not NaN (+inf passes, so its
// factor is 0 and inf entries become NaN, as the reference's eps*G/inf does).
C10_HOST_DEVICE inline bool norm_ok(float n) { return n != 0.f && !(n != n); }

// torch.sign: (0 < g) - (g < 0), so sign(NaN) = sign(-0) = 0.
template <typename M>
C10_HOST_DEVICE inline M sign_of(M g) {
  return static_cast<M>(M(0) < g) - static_cast<M>(g < M(0));
}

// ---- per-tensor factors (docs/methods.md §1 FGM, §3 PGD, §4 AWP (Kaggle)) -----------------
// Computed in float32 from the float32 statistics, in the torch backend's operation order
// (``x / n`` of a Python scalar by a tensor is reciprocal(n) * x: Tensor.__rtruediv__).
// ok false: the tensor is skipped (left bit for bit), and c = 0, s = 1.
struct StepFactors {
  bool ok;
  float c;  // FGM: eps/||G||; PGD: alpha/||G||; AWP: adv_lr*(||P||+1e-6)/(||G||+1e-6)
  float s;  // PGD: the projection factor (eps/||r|| when ||r|| > eps, else 1); 1 otherwise
};

// FGM: c = epsilon / ||G||.
C10_HOST_DEVICE inline StepFactors fgm_factors(float grad_sumsq, float epsilon) {
  const float n = sqrt_rn(grad_sumsq);
  const bool ok = norm_ok(n);
  return {ok, ok ? mul_rn(rcp_rn(n), epsilon) : 0.f, 1.f};
}

// PGD from pgd_reduce's (gg, dg, dd) = (||G||^2, <P-B, G>, ||P-B||^2) (dg = dd = 0 on the first
// step): c = alpha/||G||; ||r||^2 = dd + 2c*dg + c^2*gg, clamped at 0 (NaN kept); s = eps/||r||
// when ||r|| > eps, else 1.
C10_HOST_DEVICE inline StepFactors pgd_factors(float gg, float dg, float dd, float alpha, float epsilon) {
  const float n = sqrt_rn(gg);
  const bool ok = norm_ok(n);
  const float c = ok ? mul_rn(rcp_rn(n), alpha) : 0.f;
  float r2 = add_rn(add_rn(dd, mul_rn(mul_rn(2.f, c), dg)), mul_rn(mul_rn(c, c), gg));
  r2 = r2 < 0.f ? 0.f : r2;  // clamp_min(0); NaN stays NaN
  const float r = sqrt_rn(r2);
  return {ok, c, (ok && r > epsilon) ? mul_rn(rcp_rn(r), epsilon) : 1.f};
}

// AWP: c = adv_lr * (||P|| + 1e-6) / (||G|| + 1e-6), guard on ||G||.
C10_HOST_DEVICE inline StepFactors awp_factors(float grad_sumsq, float param_sumsq, float adv_lr) {
  const float n1 = sqrt_rn(grad_sumsq), n2 = sqrt_rn(param_sumsq);
  const bool ok = norm_ok(n1);
  return {ok, ok ? div_rn(mul_rn(adv_lr, add_rn(n2, 1e-6f)), add_rn(n1, 1e-6f)) : 0.f, 1.f};
}

// ---- per-element steps: math in opmath_t<T>, one rounding to T on return ----------------------
// FGM: P + G * c.
template <typename T>
C10_HOST_DEVICE inline T fgm_step(T p, T g, opmath_t<T> c) {
  using M = opmath_t<T>;
  return static_cast<T>(add_rn(static_cast<M>(p), mul_rn(static_cast<M>(g), c)));
}

// FGSM (docs/methods.md §2 FGSM): P + eps * sign(G).
template <typename T>
C10_HOST_DEVICE inline T fgsm_step(T p, T g, opmath_t<T> eps) {
  using M = opmath_t<T>;
  return static_cast<T>(add_rn(static_cast<M>(p), mul_rn(eps, sign_of(static_cast<M>(g)))));
}

// PGD: B + s * ((P - B) + c * G).
template <typename T>
C10_HOST_DEVICE inline T pgd_step(T p, T g, T b, opmath_t<T> c, opmath_t<T> s) {
  using M = opmath_t<T>;
  const M bv = static_cast<M>(b);
  return static_cast<T>(add_rn(bv, mul_rn(s, add_rn(sub_rn(static_cast<M>(p), bv), mul_rn(c, static_cast<M>(g))))));
}

// AWP: min(max(P + G * c, lo), hi), NaN-propagating, with the box as the reference computes it in
// P's dtype, each op rounded to T: e = adv_eps * |B|, lo = B - e, hi = B + e.
// The stages are separate functions of opmath_t values so that the CPU kernels can run them on
// float32 buffers of a bf16/fp16 block and do the roundings to T with block conversions
// (csrc/cpu/convert.h); awp_step composes them with a scalar rounding.
template <typename M>
C10_HOST_DEVICE inline M awp_box_e(M b, M adv_eps) { return mul_rn(adv_eps, abs_(b)); }  // then round to T
template <typename M>
C10_HOST_DEVICE inline M awp_box_lo(M b, M e) { return sub_rn(b, e); }                  // then round to T
template <typename M>
C10_HOST_DEVICE inline M awp_box_hi(M b, M e) { return add_rn(b, e); }                  // then round to T
template <typename M>
C10_HOST_DEVICE inline M awp_clamp(M p, M g, M c, M lo, M hi) {
  return nan_min(nan_max(add_rn(p, mul_rn(g, c)), lo), hi);
}

template <typename T>
C10_HOST_DEVICE inline T awp_step(T p, T g, T b, opmath_t<T> c, opmath_t<T> adv_eps) {
  using M = opmath_t<T>;
  const M bv = static_cast<M>(b);
  const M e = static_cast<M>(static_cast<T>(awp_box_e(bv, adv_eps)));
  const M lo = static_cast<M>(static_cast<T>(awp_box_lo(bv, e)));
  const M hi = static_cast<M>(static_cast<T>(awp_box_hi(bv, e)));
  return static_cast<T>(awp_clamp(static_cast<M>(p), static_cast<M>(g), c, lo, hi));
}

}  // namespace common
}  // namespace fused_adv
