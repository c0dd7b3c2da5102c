// CUDA kernels of the weight-space ops (FGM, FGSM, PGD, AWP): TORCH_LIBRARY_IMPL(fused_adv, CUDA).
//
// Same math as fused_adv/_torch/weight.py and csrc/cpu/weight.cpp, element for element; the
// per-tensor factors, guards and element steps are csrc/common/kernel_math.h's (shared with
// csrc/cpu, compiled here for the device):
// * element math in float32 (float64 for double tensors), rounded once to P's dtype on store;
//   AWP's box rounded to P's dtype after each op (e = adv_eps*|B|, lo = B-e, hi = B+e);
// * every multiply and add is explicitly rounded (kernel_math.h's mul_rn / add_rn are __fmul_rn /
//   __fadd_rn here): no FMA contraction, so results equal the CPU kernels' bit for bit (which are
//   built with -ffp-contract=off);
// * per-tensor factors are computed on the device from the float32 norm tensors, in every block
//   (a few flops): the zero/NaN guard never reaches the host, nothing syncs;
// * reductions: fp32 (fp64 for double) per thread, a fixed shuffle tree per block, one partial
//   per block, a fixed-order finish per tensor: deterministic, no atomics;
// * backups and restores are plain loads/stores of the element bits: bit-exact.
// Launch bookkeeping (chunk tables, vector widths) is in multi_tensor_apply.cuh.
#include <torch/library.h>

#include "cuda/multi_tensor_apply.cuh"

namespace fused_adv {
namespace cuda {
namespace {

using common::awp_factors;
using common::awp_step;
using common::fgm_factors;
using common::fgm_step;
using common::fgsm_step;
using common::opmath_t;
using common::pgd_factors;
using common::pgd_step;
using common::StepFactors;

// True if two 16-byte vectors differ in any bit (integer compare: -0 and NaN payloads count).
template <typename VT>
__device__ inline bool bits_differ(const VT& a, const VT& b) {
  static_assert(sizeof(VT) == 16, "16-byte vectors");
  const uint4 x = *reinterpret_cast<const uint4*>(&a);
  const uint4 y = *reinterpret_cast<const uint4*>(&b);
  return ((x.x ^ y.x) | (x.y ^ y.y) | (x.z ^ y.z) | (x.w ^ y.w)) != 0u;
}

template <typename T, int DEPTH>
__device__ inline T* entry(const TensorListMeta<DEPTH>& meta, int list, int t, int64_t begin) {
  return static_cast<T*>(meta.addresses[list][t]) + begin;
}

// One chunk of an update: for every element, if `backup`, b <- p (old value, bit-exact); then,
// if `apply`, p <- op(p_old, g, b_old) where b_old is the freshly copied p when `backup`, else
// read from b when `read_b`.  128-bit loads/stores when all three pointers are 16-byte aligned
// (kChunkSize is a multiple of every vector width, so chunks of an aligned tensor stay aligned).
template <typename T, typename Op>
__device__ inline void update_chunk(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ b, int64_t n,
                                    bool backup, bool apply, bool read_b, const Op& op) {
  if (!backup && !apply) return;
  constexpr int V = VecOf<T>::N;
  using VT = typename VecOf<T>::type;
  const bool vec = aligned16(p) && aligned16(g) && aligned16(b);
  const int64_t nv = vec ? n / V : 0;
  for (int64_t j = threadIdx.x; j < nv; j += blockDim.x) {
    VT pv = reinterpret_cast<const VT*>(p)[j];
    VT bv = pv;
    if (backup) {
      reinterpret_cast<VT*>(b)[j] = pv;
    } else if (read_b) {
      bv = reinterpret_cast<const VT*>(b)[j];
    }
    if (apply) {
      const VT gv = reinterpret_cast<const VT*>(g)[j];
      VT out;
#pragma unroll
      for (int k = 0; k < V; ++k) out.v[k] = op(pv.v[k], gv.v[k], bv.v[k]);
      // Store only when some bit changed: embedding rows of tokens absent from the batch have
      // G = 0 and come out unchanged; skipping their stores saves that write traffic.
      if (bits_differ(out, pv)) reinterpret_cast<VT*>(p)[j] = out;
    }
  }
  for (int64_t j = nv * V + threadIdx.x; j < n; j += blockDim.x) {
    const T pv = p[j];
    T bv = pv;
    if (backup) {
      b[j] = pv;
    } else if (read_b) {
      bv = b[j];
    }
    if (apply) p[j] = op(pv, g[j], bv);
  }
}

// ---- reductions --------------------------------------------------------------------------
template <typename T>
struct SumsqFunctor {
  float* partials;  // one float per block slot
  __device__ void operator()(const TensorListMeta<1>& meta, int t, int64_t begin, int64_t n, int64_t slot) const {
    using M = opmath_t<T>;
    constexpr int V = VecOf<T>::N;
    using VT = typename VecOf<T>::type;
    const T* x = entry<T>(meta, 0, t, begin);
    M acc = 0;
    const int64_t nv = aligned16(x) ? n / V : 0;
    for (int64_t j = threadIdx.x; j < nv; j += blockDim.x) {
      const VT a = reinterpret_cast<const VT*>(x)[j];
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const M y = static_cast<M>(a.v[k]);
        acc += y * y;
      }
    }
    for (int64_t j = nv * V + threadIdx.x; j < n; j += blockDim.x) {
      const M y = static_cast<M>(x[j]);
      acc += y * y;
    }
    float v[1] = {static_cast<float>(acc)};
    block_sum<1>(v);
    if (threadIdx.x == 0) partials[slot] = v[0];
  }
};

// (||G||^2, <P-B, G>, ||P-B||^2) partials; when `first` only the first (B is not read).
template <typename T>
struct PgdReduceFunctor {
  float* partials;  // 3 floats per block slot
  bool first;
  __device__ void operator()(const TensorListMeta<3>& meta, int t, int64_t begin, int64_t n, int64_t slot) const {
    using M = opmath_t<T>;
    constexpr int V = VecOf<T>::N;
    using VT = typename VecOf<T>::type;
    const T* p = entry<T>(meta, 0, t, begin);
    const T* g = entry<T>(meta, 1, t, begin);
    const T* b = entry<T>(meta, 2, t, begin);
    M gg = 0, dg = 0, dd = 0;
    const bool vec = aligned16(p) && aligned16(g) && aligned16(b);
    const int64_t nv = vec ? n / V : 0;
    for (int64_t j = threadIdx.x; j < nv; j += blockDim.x) {
      const VT gv = reinterpret_cast<const VT*>(g)[j];
      if (first) {
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const M y = static_cast<M>(gv.v[k]);
          gg += y * y;
        }
      } else {
        const VT pv = reinterpret_cast<const VT*>(p)[j];
        const VT bv = reinterpret_cast<const VT*>(b)[j];
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const M y = static_cast<M>(gv.v[k]);
          const M d = static_cast<M>(pv.v[k]) - static_cast<M>(bv.v[k]);
          gg += y * y;
          dg += d * y;
          dd += d * d;
        }
      }
    }
    for (int64_t j = nv * V + threadIdx.x; j < n; j += blockDim.x) {
      const M y = static_cast<M>(g[j]);
      gg += y * y;
      if (!first) {
        const M d = static_cast<M>(p[j]) - static_cast<M>(b[j]);
        dg += d * y;
        dd += d * d;
      }
    }
    float v[3] = {static_cast<float>(gg), static_cast<float>(dg), static_cast<float>(dd)};
    block_sum<3>(v);
    if (threadIdx.x == 0) {
      partials[slot * 3 + 0] = v[0];
      partials[slot * 3 + 1] = v[1];
      partials[slot * 3 + 2] = v[2];
    }
  }
};

// ---- updates -----------------------------------------------------------------------------
template <typename T>
struct FgmFunctor {
  const float* grad_sumsq;  // [N] on the device
  float epsilon;
  bool write_backup;
  __device__ void operator()(const TensorListMeta<3>& meta, int t, int64_t begin, int64_t n, int64_t) const {
    using M = opmath_t<T>;
    // per-tensor factor and guard (csrc/common/kernel_math.h), in every block: no host sync
    const StepFactors fac = fgm_factors(grad_sumsq[meta.index[t]], epsilon);
    const M c = static_cast<M>(fac.c);
    update_chunk(entry<T>(meta, 0, t, begin), entry<T>(meta, 1, t, begin), entry<T>(meta, 2, t, begin), n,
                 write_backup, fac.ok, false, [c](T pv, T gv, T) { return fgm_step(pv, gv, c); });
  }
};

template <typename T>
struct FgsmFunctor {
  double epsilon;
  bool write_backup;
  __device__ void operator()(const TensorListMeta<3>& meta, int t, int64_t begin, int64_t n, int64_t) const {
    using M = opmath_t<T>;
    const M eps = static_cast<M>(epsilon);
    update_chunk(entry<T>(meta, 0, t, begin), entry<T>(meta, 1, t, begin), entry<T>(meta, 2, t, begin), n,
                 write_backup, true, false, [eps](T pv, T gv, T) { return fgsm_step(pv, gv, eps); });
  }
};

template <typename T>
struct PgdFunctor {
  const float* stats;  // [N, 3] from pgd_reduce
  float alpha, epsilon;
  bool first;
  __device__ void operator()(const TensorListMeta<3>& meta, int t, int64_t begin, int64_t n, int64_t) const {
    using M = opmath_t<T>;
    const int64_t i = meta.index[t];
    // d = P - B = 0 on the first step (B is not read)
    const StepFactors fac = pgd_factors(stats[3 * i], first ? 0.f : stats[3 * i + 1], first ? 0.f : stats[3 * i + 2],
                                        alpha, epsilon);
    const M c = static_cast<M>(fac.c), s = static_cast<M>(fac.s);
    // skipped tensors (ok false) keep P bit for bit; the backup is still written on `first`
    update_chunk(entry<T>(meta, 0, t, begin), entry<T>(meta, 1, t, begin), entry<T>(meta, 2, t, begin), n,
                 first, fac.ok, true, [c, s](T pv, T gv, T bv) { return pgd_step(pv, gv, bv, c, s); });
  }
};

template <typename T>
struct AwpFunctor {
  const float* grad_sumsq;   // [N]
  const float* param_sumsq;  // [N]
  float adv_lr;
  double adv_eps;
  bool first;
  __device__ void operator()(const TensorListMeta<3>& meta, int t, int64_t begin, int64_t n, int64_t) const {
    using M = opmath_t<T>;
    const int64_t i = meta.index[t];
    const StepFactors fac = awp_factors(grad_sumsq[i], param_sumsq[i], adv_lr);
    const M c = static_cast<M>(fac.c), ae = static_cast<M>(adv_eps);
    update_chunk(entry<T>(meta, 0, t, begin), entry<T>(meta, 1, t, begin), entry<T>(meta, 2, t, begin), n,
                 first, fac.ok, true, [c, ae](T pv, T gv, T bv) { return awp_step(pv, gv, bv, c, ae); });
  }
};

// P <- B, bit-exact.
template <typename T>
struct CopyFunctor {
  __device__ void operator()(const TensorListMeta<2>& meta, int t, int64_t begin, int64_t n, int64_t) const {
    T* __restrict__ dst = entry<T>(meta, 0, t, begin);
    const T* __restrict__ src = entry<T>(meta, 1, t, begin);
    constexpr int V = VecOf<T>::N;
    using VT = typename VecOf<T>::type;
    const int64_t nv = (aligned16(dst) && aligned16(src)) ? n / V : 0;
    for (int64_t j = threadIdx.x; j < nv; j += blockDim.x) reinterpret_cast<VT*>(dst)[j] = reinterpret_cast<const VT*>(src)[j];
    for (int64_t j = nv * V + threadIdx.x; j < n; j += blockDim.x) dst[j] = src[j];
  }
};

// ---- host side ---------------------------------------------------------------------------
// Argument checks of this file's ops: CUDA tensors on one device (csrc/common/checks.h).
void check_lists(const char* op, std::initializer_list<std::pair<const char*, at::TensorList>> lists) {
  common::check_lists(op, c10::DeviceType::CUDA, lists);
}
const float* check_scalars(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like,
                           int64_t n, int64_t cols = 0) {
  return common::check_scalars(op, name, t, like.device(), n, cols);
}

// Tensor indices grouped by dtype (one launch sequence per dtype), groups in order of first
// appearance.  Reduction slots are laid out in this same order.
std::vector<std::pair<at::ScalarType, std::vector<int64_t>>> dtype_groups(at::TensorList ts) {
  std::vector<std::pair<at::ScalarType, std::vector<int64_t>>> groups;
  for (int64_t i = 0; i < static_cast<int64_t>(ts.size()); ++i) {
    const auto st = ts[i].scalar_type();
    auto it = std::find_if(groups.begin(), groups.end(), [&](const auto& g) { return g.first == st; });
    if (it == groups.end()) {
      groups.push_back({st, {i}});
    } else {
      it->second.push_back(i);
    }
  }
  return groups;
}

// Slot layout of a reduction over `ts`: base[i], count[i] per tensor; returns the total.
int64_t slot_layout(at::TensorList ts, const std::vector<std::pair<at::ScalarType, std::vector<int64_t>>>& groups,
                    std::vector<int64_t>& base, std::vector<int64_t>& count) {
  base.assign(ts.size(), 0);
  count.assign(ts.size(), 0);
  int64_t slot = 0;
  for (const auto& g : groups) {
    for (const int64_t i : g.second) {
      base[i] = slot;
      count[i] = chunks_of(ts[i].numel());
      slot += count[i];
    }
  }
  return slot;
}

#define FUSED_ADV_DISPATCH(ST, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ST, "fused_adv_cuda", __VA_ARGS__)

at::Tensor multi_tensor_sumsq_cuda(at::TensorList tensors) {
  check_lists("multi_tensor_sumsq", {{"tensors", tensors}});
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  const auto groups = dtype_groups(tensors);
  std::vector<int64_t> base, count;
  const int64_t slots = slot_layout(tensors, groups, base, count);
  const auto opts = tensors[0].options().dtype(at::kFloat);
  at::Tensor partials = at::empty({std::max<int64_t>(slots, 1)}, opts);
  int64_t slot = 0;
  for (const auto& g : groups) {
    FUSED_ADV_DISPATCH(g.first, [&] {
      slot = multi_tensor_apply<1>({tensors}, g.second, SumsqFunctor<scalar_t>{partials.data_ptr<float>()}, slot);
    });
  }
  at::Tensor out = at::empty({static_cast<int64_t>(tensors.size())}, opts);
  finish<1>(partials, out, base, count);
  return out;
}

at::Tensor pgd_reduce_cuda(at::TensorList params, at::TensorList grads, at::TensorList backups, bool first) {
  check_lists("pgd_reduce", {{"params", params}, {"grads", grads}, {"backups", backups}});
  const c10::cuda::CUDAGuard guard(params[0].device());
  const auto groups = dtype_groups(params);
  std::vector<int64_t> base, count;
  const int64_t slots = slot_layout(params, groups, base, count);
  const auto opts = params[0].options().dtype(at::kFloat);
  at::Tensor partials = at::empty({std::max<int64_t>(slots, 1) * 3}, opts);
  int64_t slot = 0;
  for (const auto& g : groups) {
    FUSED_ADV_DISPATCH(g.first, [&] {
      slot = multi_tensor_apply<3>({params, grads, backups}, g.second,
                                   PgdReduceFunctor<scalar_t>{partials.data_ptr<float>(), first}, slot);
    });
  }
  at::Tensor out = at::empty({static_cast<int64_t>(params.size()), 3}, opts);
  finish<3>(partials, out, base, count);
  return out;
}

void fgm_perturb_cuda(at::TensorList params, at::TensorList grads, at::TensorList backups, const at::Tensor& grad_sumsq,
                      double epsilon, bool write_backup) {
  check_lists("fgm_perturb_", {{"params", params}, {"grads", grads}, {"backups", backups}});
  const c10::cuda::CUDAGuard guard(params[0].device());
  const float* gsq = check_scalars("fgm_perturb_", "grad_sumsq", grad_sumsq, params[0], params.size());
  for (const auto& g : dtype_groups(params)) {
    FUSED_ADV_DISPATCH(g.first, [&] {
      multi_tensor_apply<3>({params, grads, backups}, g.second,
                            FgmFunctor<scalar_t>{gsq, static_cast<float>(epsilon), write_backup});
    });
  }
}

void fgsm_perturb_cuda(at::TensorList params, at::TensorList grads, at::TensorList backups, double epsilon,
                       bool write_backup) {
  check_lists("fgsm_perturb_", {{"params", params}, {"grads", grads}, {"backups", backups}});
  const c10::cuda::CUDAGuard guard(params[0].device());
  for (const auto& g : dtype_groups(params)) {
    FUSED_ADV_DISPATCH(g.first, [&] {
      multi_tensor_apply<3>({params, grads, backups}, g.second, FgsmFunctor<scalar_t>{epsilon, write_backup});
    });
  }
}

void pgd_perturb_cuda(at::TensorList params, at::TensorList grads, at::TensorList backups, const at::Tensor& stats,
                      double alpha, double epsilon, bool first) {
  check_lists("pgd_perturb_", {{"params", params}, {"grads", grads}, {"backups", backups}});
  const c10::cuda::CUDAGuard guard(params[0].device());
  const float* st = check_scalars("pgd_perturb_", "stats", stats, params[0], params.size(), 3);
  for (const auto& g : dtype_groups(params)) {
    FUSED_ADV_DISPATCH(g.first, [&] {
      multi_tensor_apply<3>({params, grads, backups}, g.second,
                            PgdFunctor<scalar_t>{st, static_cast<float>(alpha), static_cast<float>(epsilon), first});
    });
  }
}

void awp_perturb_cuda(at::TensorList params, at::TensorList grads, at::TensorList backups, const at::Tensor& grad_sumsq,
                      const at::Tensor& param_sumsq, double adv_lr, double adv_eps, bool first) {
  check_lists("awp_perturb_", {{"params", params}, {"grads", grads}, {"backups", backups}});
  const c10::cuda::CUDAGuard guard(params[0].device());
  const float* gsq = check_scalars("awp_perturb_", "grad_sumsq", grad_sumsq, params[0], params.size());
  const float* psq = check_scalars("awp_perturb_", "param_sumsq", param_sumsq, params[0], params.size());
  for (const auto& g : dtype_groups(params)) {
    FUSED_ADV_DISPATCH(g.first, [&] {
      multi_tensor_apply<3>({params, grads, backups}, g.second,
                            AwpFunctor<scalar_t>{gsq, psq, static_cast<float>(adv_lr), adv_eps, first});
    });
  }
}

void restore_cuda(at::TensorList params, at::TensorList backups) {
  check_lists("restore_", {{"params", params}, {"backups", backups}});
  const c10::cuda::CUDAGuard guard(params[0].device());
  for (const auto& g : dtype_groups(params)) {
    FUSED_ADV_DISPATCH(g.first, [&] { multi_tensor_apply<2>({params, backups}, g.second, CopyFunctor<scalar_t>{}); });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_adv, CUDA, m) {
  m.impl("multi_tensor_sumsq", &multi_tensor_sumsq_cuda);
  m.impl("pgd_reduce", &pgd_reduce_cuda);
  m.impl("fgm_perturb_", &fgm_perturb_cuda);
  m.impl("fgsm_perturb_", &fgsm_perturb_cuda);
  m.impl("pgd_perturb_", &pgd_perturb_cuda);
  m.impl("awp_perturb_", &awp_perturb_cuda);
  m.impl("restore_", &restore_cuda);
}

}  // namespace cuda
}  // namespace fused_adv
