// CPU kernels of the sam ops (SAM / ASAM): TORCH_LIBRARY_IMPL(fused_adv, CPU).
//
// The math is fused_adv/_torch/sam.py's, element for element; the factor and element step are
// csrc/common/sam_math.h's (shared with csrc/cuda/sam.cu).  As csrc/cpu/weight.cpp: element math
// in float32 (float64 for double tensors), one rounding to the stored dtype; reductions accumulate
// float32 partials over 64 elements flushed to double, one partial per fixed-size chunk summed in
// chunk order (results independent of the thread count); backups are memcpy (bit-exact); each
// phase is one parallel pass over the chunks of all tensors (multi_tensor.h).
#include <torch/library.h>

#include <type_traits>

#include "common/sam_math.h"
#include "cpu/convert.h"
#include "cpu/multi_tensor.h"
#include "cpu/vec.h"

namespace fused_adv {
namespace cpu {
namespace {

using common::sam_scale;
using common::sam_step;
using common::sam_term;

template <typename T>
T* ptr(const at::Tensor& t, const Chunk& ch) {
  return static_cast<T*>(t.data_ptr()) + ch.begin;
}

// Sum of sam_term^2 over one chunk: eight lanes of float32 partials over 64 elements flushed to
// double (one AVX register or a lane loop: vec.h; fixed combination order), double throughout
// for double tensors.  bf16/fp16 chunks go through float32 buffers (convert.h): blocks of a
// multiple of 64 elements summed by the float path give the same lanes, hence the same bits.
template <int W, bool ADAPTIVE>
FUSED_ADV_INLINE void sam_sumsq_into(const float* __restrict__ p, const float* __restrict__ g, int64_t n,
                                     double acc[8]) {
  constexpr int R = 8 / W;
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    vec::vf<W> f[R];
    for (int r = 0; r < R; ++r) f[r] = vec::splat<W>(0.f);
    for (int s = 0; s < 64; s += 8) {
      for (int r = 0; r < R; ++r) {
        const int64_t j = i + s + r * W;
        vec::vf<W> v;
        if constexpr (W == 1) {
          v = sam_term<ADAPTIVE, float>(ADAPTIVE ? p[j] : 0.f, g[j]);
        } else {
          v = ADAPTIVE ? vec::abs_(vec::load<W>(p + j)) * vec::load<W>(g + j) : vec::load<W>(g + j);
        }
        f[r] += v * v;
      }
    }
    for (int r = 0; r < R; ++r) {
      for (int k = 0; k < W; ++k) acc[r * W + k] += vec::lane<W>(f[r], k);
    }
  }
  for (; i < n; ++i) {
    const double v = static_cast<double>(sam_term<ADAPTIVE, float>(ADAPTIVE ? p[i] : 0.f, g[i]));
    acc[i & 7] += v * v;
  }
}

template <bool ADAPTIVE>
void sam_sumsq_into_f64(const double* __restrict__ p, const double* __restrict__ g, int64_t n, double acc[8]) {
  for (int64_t i = 0; i < n; ++i) {
    const double v = sam_term<ADAPTIVE, double>(ADAPTIVE ? p[i] : 0.0, g[i]);
    acc[i & 7] += v * v;
  }
}

constexpr int64_t kWidenBlock = 1024;  // elements per float32 buffer: a multiple of 64

template <int W, bool ADAPTIVE, typename T>
FUSED_ADV_INLINE double chunk_sam_sumsq(const T* __restrict__ p, const T* __restrict__ g, int64_t n) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  if constexpr (std::is_same_v<T, double>) {
    sam_sumsq_into_f64<ADAPTIVE>(p, g, n, acc);
  } else if constexpr (std::is_same_v<T, float>) {
    sam_sumsq_into<W, ADAPTIVE>(p, g, n, acc);
  } else {
    alignas(64) float pf[kWidenBlock], gf[kWidenBlock];
    for (int64_t j0 = 0; j0 < n; j0 += kWidenBlock) {
      const int64_t m = std::min(kWidenBlock, n - j0);
      if (ADAPTIVE) to_float(p + j0, pf, m);
      to_float(g + j0, gf, m);
      sam_sumsq_into<W, ADAPTIVE>(static_cast<const float*>(pf), static_cast<const float*>(gf), m, acc);
    }
  }
  return vec::combine8(acc);
}

at::Tensor sam_sumsq_cpu(at::TensorList params, at::TensorList grads, bool adaptive) {
  common::check_lists("sam_sumsq", c10::DeviceType::CPU, {{"params", params}, {"grads", grads}});
  const auto plan = plan_chunks(params);
  std::vector<double> partials(plan.chunks.size());
  for_each_chunk(plan, [&](int64_t c, const Chunk& ch) {
    dispatch_float(params[ch.tensor].scalar_type(), [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      const T* p = ptr<T>(params[ch.tensor], ch);
      const T* g = ptr<T>(grads[ch.tensor], ch);
      vec::with_width([&](auto w) {
        constexpr int W = decltype(w)::value;
        partials[c] = adaptive ? chunk_sam_sumsq<W, true>(p, g, ch.end - ch.begin)
                               : chunk_sam_sumsq<W, false>(p, g, ch.end - ch.begin);
      });
    });
  });
  const int64_t n = static_cast<int64_t>(params.size());
  at::Tensor out = at::empty({n}, at::TensorOptions().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  for (int64_t t = 0; t < n; ++t) {
    double s = 0;
    for (int64_t c = plan.first[t]; c < plan.first[t + 1]; ++c) s += partials[c];
    o[t] = static_cast<float>(s);
  }
  return out;
}

// P' = sam_step(P, G) over one chunk, in place, on T's own elements (vec.h map: lanes widened and
// rounded in registers, or csrc/common's sam_step on the scalar path).
template <int W, bool ADAPTIVE, typename T>
FUSED_ADV_INLINE void sam_chunk(T* p, const T* __restrict__ g, float scale, int64_t n) {
  const auto vec_step = [scale](auto pv, auto gv) { return pv + (ADAPTIVE ? (pv * pv) * gv : gv) * scale; };
  const auto step = [scale](auto pv, auto gv) { return sam_step<ADAPTIVE>(pv, gv, scale); };
  for (int64_t j0 = 0; j0 < n; j0 += kWidenBlock) {
    const int m = static_cast<int>(std::min(kWidenBlock, n - j0));
    vec::map<W>(m, p + j0, vec_step, step, static_cast<const T*>(p + j0), g + j0);
  }
}

void sam_perturb_cpu(at::TensorList params, at::TensorList grads, at::TensorList backups,
                     const at::Tensor& grad_sumsq, double rho, bool adaptive) {
  common::check_lists("sam_perturb_", c10::DeviceType::CPU,
                      {{"params", params}, {"grads", grads}, {"backups", backups}});
  TORCH_CHECK(grad_sumsq.dim() == 1, "fused_adv::sam_perturb_: grad_sumsq must be a vector, got ",
              grad_sumsq.sizes());
  const int64_t M = grad_sumsq.size(0);
  const float* gsq = common::check_scalars("sam_perturb_", "grad_sumsq", grad_sumsq,
                                           c10::Device(c10::DeviceType::CPU), M);
  // The one global norm: float64 sum in index order, rounded to float32 (the torch backend's).
  double total = 0;
  for (int64_t k = 0; k < M; ++k) total += static_cast<double>(gsq[k]);
  const auto f = sam_scale(static_cast<float>(total), static_cast<float>(rho));
  const auto plan = plan_chunks(params);
  for_each_chunk(plan, [&](int64_t, const Chunk& ch) {
    const int64_t i = ch.tensor;
    dispatch_float(params[i].scalar_type(), [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      const int64_t len = ch.end - ch.begin;
      T* p = ptr<T>(params[i], ch);
      std::memcpy(ptr<T>(backups[i], ch), p, static_cast<size_t>(len) * sizeof(T));  // always
      if (!f.ok) return;  // non-finite global norm: P stays bit for bit
      const T* g = ptr<T>(grads[i], ch);
      if constexpr (std::is_same_v<T, double>) {
        const double s = f.scale;
        for (int64_t j = 0; j < len; ++j) p[j] = adaptive ? sam_step<true>(p[j], g[j], s) : sam_step<false>(p[j], g[j], s);
      } else {
        vec::with_width([&](auto w) {
          constexpr int W = decltype(w)::value;
          if (adaptive) {
            sam_chunk<W, true, T>(p, g, f.scale, len);
          } else {
            sam_chunk<W, false, T>(p, g, f.scale, len);
          }
        });
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_adv, CPU, m) {
  m.impl("sam_sumsq", &sam_sumsq_cpu);
  m.impl("sam_perturb_", &sam_perturb_cpu);
}

}  // namespace cpu
}  // namespace fused_adv
