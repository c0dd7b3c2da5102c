// CPU kernels of the weight_ext ops (MI-FGSM, the AWP paper's perturb/restore):
// TORCH_LIBRARY_IMPL(fused_adv, CPU).
//
// The math is fused_adv/_torch/weight_ext.py's, element for element; the per-tensor factors and
// element steps are csrc/common/weight_ext_math.h's (shared with csrc/cuda/weight_ext.cu).  As in
// csrc/cpu/weight.cpp: element math in float32 (float64 for double tensors), one rounding to the
// stored dtype; reductions sum 8 float32 lanes over 64 elements into double, one partial per
// fixed-size chunk summed in chunk order (results independent of the thread count); backups are
// memcpy (bit-exact); each phase is one parallel pass over the chunks of all tensors
// (multi_tensor.h), each chunk 8 lanes wide on AVX2 CPUs or scalar, same bits (vec.h).
#include <torch/library.h>

#include <type_traits>

#include "common/weight_ext_math.h"
#include "cpu/convert.h"
#include "cpu/multi_tensor.h"
#include "cpu/vec.h"

namespace fused_adv {
namespace cpu {
namespace {

using common::awp_paper_factor;
using common::awp_paper_step;
using common::mifgsm_momentum;
using common::mifgsm_param;
using common::norm_ok;
using common::opmath_t;

// Elements per block of the update passes.
constexpr int64_t kUpdateBlock = 1024;

void check_lists(const char* op, std::initializer_list<std::pair<const char*, at::TensorList>> lists) {
  common::check_lists(op, c10::DeviceType::CPU, lists);
}
const float* check_scalars(const char* op, const char* name, const at::Tensor& t, int64_t n) {
  return common::check_scalars(op, name, t, c10::Device(c10::DeviceType::CPU), n);
}

template <typename T>
T* ptr(const at::Tensor& t, const Chunk& ch) {
  return static_cast<T*>(t.data_ptr()) + ch.begin;
}

// Sum of |x| over one chunk: eight lanes, float32 partials over 64 elements flushed to double
// (the pattern of weight.cpp's chunk_sumsq: one AVX register or a lane loop, vec.h; fixed
// combination order).  bf16/fp16: widened in blocks of a multiple of 64 elements and summed by
// the float path: the same lanes, the same bits.
template <int W>
FUSED_ADV_INLINE void abssum_into(const float* __restrict__ x, int64_t n, double acc[8]) {
  constexpr int R = 8 / W;
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    vec::vf<W> f[R];
    for (int r = 0; r < R; ++r) f[r] = vec::splat<W>(0.f);
    for (int s = 0; s < 64; s += 8) {
      for (int r = 0; r < R; ++r) {
        if constexpr (W == 1) {
          f[r] += std::fabs(x[i + s + r]);
        } else {
          f[r] += vec::abs_(vec::load<W>(x + i + s + r * W));
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      for (int k = 0; k < W; ++k) acc[r * W + k] += vec::lane<W>(f[r], k);
    }
  }
  for (; i < n; ++i) acc[i & 7] += std::fabs(static_cast<double>(x[i]));
}

template <int W, typename T>
FUSED_ADV_INLINE double chunk_abssum(const T* __restrict__ x, int64_t n) {
  return vec::sum8(x, n, [](const auto* v, int64_t m, double* acc) {
    if constexpr (std::is_same_v<decltype(v), const double*>) {
      for (int64_t i = 0; i < m; ++i) acc[i & 7] += std::fabs(v[i]);
    } else {
      abssum_into<W>(v, m, acc);
    }
  });
}

at::Tensor multi_tensor_abssum_cpu(at::TensorList tensors) {
  check_lists("multi_tensor_abssum", {{"tensors", tensors}});
  const auto plan = plan_chunks(tensors);
  std::vector<double> partials(plan.chunks.size());
  for_each_chunk(plan, [&](int64_t c, const Chunk& ch) {
    dispatch_float(tensors[ch.tensor].scalar_type(), [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      const T* x = tensors[ch.tensor].template const_data_ptr<T>() + ch.begin;
      vec::with_width([&](auto w) { partials[c] = chunk_abssum<decltype(w)::value>(x, ch.end - ch.begin); });
    });
  });
  const int64_t n = static_cast<int64_t>(tensors.size());
  at::Tensor out = at::empty({n}, at::TensorOptions().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  for (int64_t t = 0; t < n; ++t) {
    double s = 0;
    for (int64_t c = plan.first[t]; c < plan.first[t + 1]; ++c) s += partials[c];
    o[t] = static_cast<float>(s);
  }
  return out;
}

// One MI-FGSM chunk: the momentum M' = mifgsm_momentum(G, M) is stored in T first (P's step reads
// the stored sign), then P' = mifgsm_param(P, M', B) with the box B -+ eps rounded to T.
// Both work on T's own elements (vec.h map, two passes over a block; roundings in registers).
template <int W, bool FIRST, typename T>
FUSED_ADV_INLINE void mifgsm_chunk(T* p, const T* __restrict__ g, T* m, const T* __restrict__ b, int64_t len,
                                   opmath_t<T> n, opmath_t<T> a, opmath_t<T> e, opmath_t<T> d) {
  if constexpr (std::is_same_v<T, double>) {
    for (int64_t j = 0; j < len; ++j) {
      const T mt = mifgsm_momentum<T>(g[j], FIRST ? T(0) : m[j], n, d, FIRST);
      m[j] = mt;
      p[j] = mifgsm_param<T>(p[j], mt, b[j], a, e);
    }
  } else {
    for (int64_t j0 = 0; j0 < len; j0 += kUpdateBlock) {
      const int cnt = static_cast<int>(std::min(kUpdateBlock, len - j0));
      const T* mj = m + j0;
      if constexpr (FIRST) {
        vec::map<W>(
            cnt, m + j0, [n](auto gv) { return gv / n; },
            [n, d](T gv) { return mifgsm_momentum<T>(gv, T(0), n, d, true); }, g + j0);
      } else {
        vec::map<W>(
            cnt, m + j0, [n, d](auto gv, auto mv) { return d * mv + gv / n; },
            [n, d](T gv, T mv) { return mifgsm_momentum<T>(gv, mv, n, d, false); }, g + j0, mj);
      }
      vec::map<W>(
          cnt, p + j0,
          [a, e](auto pv, auto mv, auto bv) {  // mifgsm_param, lane by lane (clamp_nan's NaN rule)
            const auto v = pv + a * vec::sign_of(mv);
            const auto lo = vec::round_to<T>(bv - e), hi = vec::round_to<T>(bv + e);
            const auto nan = (v != v) | (lo != lo) | (hi != hi);
            auto r = v > lo ? v : lo;
            r = r < hi ? r : hi;
            return nan ? v + lo + hi : r;
          },
          [a, e](T pv, T mv, T bv) { return mifgsm_param<T>(pv, mv, bv, a, e); }, static_cast<const T*>(p + j0), mj,
          b + j0);
    }
  }
}

void mifgsm_perturb_cpu(at::TensorList params, at::TensorList grads, at::TensorList momenta, at::TensorList backups,
                        const at::Tensor& grad_abssum, double alpha, double epsilon, double decay, bool first) {
  check_lists("mifgsm_perturb_", {{"params", params}, {"grads", grads}, {"momenta", momenta}, {"backups", backups}});
  const int64_t N = static_cast<int64_t>(params.size());
  const float* n1 = check_scalars("mifgsm_perturb_", "grad_abssum", grad_abssum, N);
  const auto plan = plan_chunks(params);
  for_each_chunk(plan, [&](int64_t, const Chunk& ch) {
    const int64_t i = ch.tensor;
    const bool ok = norm_ok(n1[i]);
    dispatch_float(params[i].scalar_type(), [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      using M = opmath_t<T>;
      const int64_t len = ch.end - ch.begin;
      T* p = ptr<T>(params[i], ch);
      T* m = ptr<T>(momenta[i], ch);
      T* b = ptr<T>(backups[i], ch);
      if (first) std::memcpy(b, p, static_cast<size_t>(len) * sizeof(T));  // every tensor, guarded or not
      if (!ok) {  // skipped: P and M unchanged; the momentum of a first step starts at 0
        if (first) std::fill(m, m + len, T(0));
        return;
      }
      const M n = static_cast<M>(n1[i]), a = static_cast<M>(alpha), e = static_cast<M>(epsilon),
              d = static_cast<M>(decay);
      vec::with_width([&](auto w) {
        constexpr int W = decltype(w)::value;
        if (first) {
          mifgsm_chunk<W, true, T>(p, ptr<T>(grads[i], ch), m, b, len, n, a, e, d);
        } else {
          mifgsm_chunk<W, false, T>(p, ptr<T>(grads[i], ch), m, b, len, n, a, e, d);
        }
      });
    });
  });
}

void awp_paper_add_cpu(at::TensorList params, at::TensorList dirs, const at::Tensor& param_sumsq,
                       const at::Tensor& dir_sumsq, double scale, double coeff) {
  check_lists("awp_paper_add_", {{"params", params}, {"dirs", dirs}});
  const int64_t N = static_cast<int64_t>(params.size());
  const float* wsq = check_scalars("awp_paper_add_", "param_sumsq", param_sumsq, N);
  const float* dsq = check_scalars("awp_paper_add_", "dir_sumsq", dir_sumsq, N);
  std::vector<float> f(N);
  for (int64_t i = 0; i < N; ++i) f[i] = awp_paper_factor(wsq[i], dsq[i], static_cast<float>(scale));
  const auto plan = plan_chunks(params);
  for_each_chunk(plan, [&](int64_t, const Chunk& ch) {
    const int64_t i = ch.tensor;
    dispatch_float(params[i].scalar_type(), [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      using M = opmath_t<T>;
      T* __restrict__ p = ptr<T>(params[i], ch);
      const T* __restrict__ d = ptr<T>(dirs[i], ch);
      const M fi = static_cast<M>(f[i]), c = static_cast<M>(coeff);
      const int64_t len = ch.end - ch.begin;
      if constexpr (std::is_same_v<T, double>) {
        for (int64_t j = 0; j < len; ++j) p[j] = awp_paper_step<T>(p[j], d[j], fi, c);
      } else {
        vec::with_width([&](auto w) {
          constexpr int W = decltype(w)::value;
          const auto step = [fi, c](auto pv, auto dv) { return awp_paper_step(pv, dv, fi, c); };
          for (int64_t j0 = 0; j0 < len; j0 += kUpdateBlock) {
            const int cnt = static_cast<int>(std::min(kUpdateBlock, len - j0));
            // diff = f*D rounded to T, then P + coeff*diff
            vec::map<W>(
                cnt, p + j0, [fi, c](auto pv, auto dv) { return pv + c * vec::round_to<T>(dv * fi); }, step,
                static_cast<const T*>(p + j0), d + j0);
          }
        });
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_adv, CPU, m) {
  m.impl("multi_tensor_abssum", &multi_tensor_abssum_cpu);
  m.impl("mifgsm_perturb_", &mifgsm_perturb_cpu);
  m.impl("awp_paper_add_", &awp_paper_add_cpu);
}

}  // namespace cpu
}  // namespace fused_adv
