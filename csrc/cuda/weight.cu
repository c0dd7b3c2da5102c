// CUDA kernels of the weight-space ops (FGM, FGSM, PGD, AWP): TORCH_LIBRARY_IMPL(fused_adv, CUDA).
//
// Same math as fused_adv/_torch/weight.py and csrc/cpu/weight.cpp, element for element:
// * element math in float32 (float64 for double tensors), rounded once to P's dtype on store;
//   AWP's box rounded to P's dtype after each op (e = adv_eps*|B|, lo = B-e, hi = B+e);
// * every multiply and add is explicitly rounded (__fmul_rn / __fadd_rn): no FMA contraction,
//   so results equal the CPU kernels' bit for bit (which are built with -ffp-contract=off);
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

template <typename T>
using opmath = at::opmath_type<T>;  // float for half/bfloat16/float, double for double

// Correctly rounded multiply / add that the compiler may not fuse into an FMA.
__device__ inline float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ inline double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ inline float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ inline double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ inline float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ inline double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ inline float abs_(float a) { return fabsf(a); }
__device__ inline double abs_(double a) { return fabs(a); }

// NaN-propagating max / min (torch.maximum / torch.minimum).
template <typename M>
__device__ inline M nan_max(M a, M b) {
  return (a != a) ? a : (b != b) ? b : (a > b ? a : b);
}
template <typename M>
__device__ inline M nan_min(M a, M b) {
  return (a != a) ? a : (b != b) ? b : (a < b ? a : b);
}

// The zero/NaN guard of every norm-scaled step: n != 0 and n is not NaN (+inf passes).
__device__ inline bool norm_ok(float n) { return n != 0.f && !(n != n); }

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
// (CHUNK is a multiple of every vector width, so chunks of an aligned tensor stay aligned).
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
    using M = opmath<T>;
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
    using M = opmath<T>;
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
    using M = opmath<T>;
    const float nrm = sqrtf(grad_sumsq[meta.index[t]]);
    const bool ok = norm_ok(nrm);  // n = +inf passes: factor 0, inf entries become NaN
    // torch backend: epsilon / n is reciprocal(n) * epsilon (Tensor.__rtruediv__)
    const M f = static_cast<M>(ok ? __fmul_rn(__frcp_rn(nrm), epsilon) : 0.f);
    update_chunk(entry<T>(meta, 0, t, begin), entry<T>(meta, 1, t, begin), entry<T>(meta, 2, t, begin), n,
                 write_backup, ok, false, [f](T pv, T gv, T) {
                   return static_cast<T>(add_rn(static_cast<M>(pv), mul_rn(static_cast<M>(gv), f)));
                 });
  }
};

template <typename T>
struct FgsmFunctor {
  double epsilon;
  bool write_backup;
  __device__ void operator()(const TensorListMeta<3>& meta, int t, int64_t begin, int64_t n, int64_t) const {
    using M = opmath<T>;
    const M eps = static_cast<M>(epsilon);
    update_chunk(entry<T>(meta, 0, t, begin), entry<T>(meta, 1, t, begin), entry<T>(meta, 2, t, begin), n,
                 write_backup, true, false, [eps](T pv, T gv, T) {
                   const M x = static_cast<M>(gv);
                   // torch.sign: (0 < g) - (g < 0), so sign(NaN) = 0
                   const M s = static_cast<M>(M(0) < x) - static_cast<M>(x < M(0));
                   return static_cast<T>(add_rn(static_cast<M>(pv), mul_rn(eps, s)));
                 });
  }
};

template <typename T>
struct PgdFunctor {
  const float* stats;  // [N, 3] from pgd_reduce
  float alpha, epsilon;
  bool first;
  __device__ void operator()(const TensorListMeta<3>& meta, int t, int64_t begin, int64_t n, int64_t) const {
    using M = opmath<T>;
    const int64_t i = meta.index[t];
    const float gg = stats[3 * i], dg = first ? 0.f : stats[3 * i + 1], dd = first ? 0.f : stats[3 * i + 2];
    const float nrm = sqrtf(gg);
    const bool ok = norm_ok(nrm);
    const float c = ok ? __fmul_rn(__frcp_rn(nrm), alpha) : 0.f;
    // ||r||^2 = dd + 2c*dg + c^2*gg, clamped at 0 (NaN kept), as the torch backend orders it
    float r2 = __fadd_rn(__fadd_rn(dd, __fmul_rn(__fmul_rn(2.f, c), dg)), __fmul_rn(__fmul_rn(c, c), gg));
    r2 = r2 < 0.f ? 0.f : r2;
    const float r = sqrtf(r2);
    const float s = (ok && r > epsilon) ? __fmul_rn(__frcp_rn(r), epsilon) : 1.f;
    const M cm = static_cast<M>(c), sm = static_cast<M>(s);
    // skipped tensors (ok false) keep P bit for bit; the backup is still written on `first`
    update_chunk(entry<T>(meta, 0, t, begin), entry<T>(meta, 1, t, begin), entry<T>(meta, 2, t, begin), n,
                 first, ok, true, [cm, sm](T pv, T gv, T bv) {
                   const M b = static_cast<M>(bv);
                   const M step = add_rn(sub_rn(static_cast<M>(pv), b), mul_rn(cm, static_cast<M>(gv)));
                   return static_cast<T>(add_rn(b, mul_rn(sm, step)));
                 });
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
    using M = opmath<T>;
    const int64_t i = meta.index[t];
    const float n1 = sqrtf(grad_sumsq[i]), n2 = sqrtf(param_sumsq[i]);
    const bool ok = norm_ok(n1);
    const float f = ok ? __fdiv_rn(__fmul_rn(adv_lr, __fadd_rn(n2, 1e-6f)), __fadd_rn(n1, 1e-6f)) : 0.f;
    const M fm = static_cast<M>(f), ae = static_cast<M>(adv_eps);
    update_chunk(entry<T>(meta, 0, t, begin), entry<T>(meta, 1, t, begin), entry<T>(meta, 2, t, begin), n,
                 first, ok, true, [fm, ae](T pv, T gv, T bv) {
                   // the box as the reference computes it in P's dtype: each op rounded to T
                   const M b = static_cast<M>(bv);
                   const M e = static_cast<M>(static_cast<T>(mul_rn(ae, abs_(b))));
                   const M lo = static_cast<M>(static_cast<T>(sub_rn(b, e)));
                   const M hi = static_cast<M>(static_cast<T>(add_rn(b, e)));
                   const M v = add_rn(static_cast<M>(pv), mul_rn(static_cast<M>(gv), fm));
                   return static_cast<T>(nan_min(nan_max(v, lo), hi));
                 });
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
void check_lists(const char* op, std::initializer_list<std::pair<const char*, at::TensorList>> lists) {
  const auto& head = *lists.begin();
  const size_t n = head.second.size();
  TORCH_CHECK(n > 0, "fused_adv::", op, ": empty tensor lists are handled by fused_adv.ops");
  const c10::Device device = head.second[0].device();
  for (const auto& lst : lists) {
    TORCH_CHECK(lst.second.size() == n, "fused_adv::", op, ": got ", n, " ", head.first, " but ",
                lst.second.size(), " ", lst.first);
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor& t = lst.second[i];
      const at::Tensor& h = head.second[i];
      TORCH_CHECK(t.device() == device, "fused_adv::", op, ": ", lst.first, "[", i, "] is on ", t.device(),
                  ", ", head.first, "[0] on ", device, "; one call serves one CUDA device");
      TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble || t.scalar_type() == at::kHalf ||
                      t.scalar_type() == at::kBFloat16,
                  "fused_adv::", op, ": ", lst.first, "[", i, "] has dtype ", t.scalar_type(),
                  "; expected float32, float64, float16 or bfloat16");
      TORCH_CHECK(t.is_contiguous(), "fused_adv::", op, ": ", lst.first, "[", i, "] must be contiguous");
      TORCH_CHECK(t.sizes() == h.sizes() && t.scalar_type() == h.scalar_type(), "fused_adv::", op, ": ", lst.first,
                  "[", i, "] is ", t.sizes(), " ", t.scalar_type(), " but ", head.first, "[", i, "] is ",
                  h.sizes(), " ", h.scalar_type());
    }
  }
}

const float* check_scalars(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like,
                           int64_t n, int64_t cols = 0) {
  TORCH_CHECK(t.device() == like.device() && t.scalar_type() == at::kFloat && t.is_contiguous(), "fused_adv::", op,
              ": ", name, " must be a contiguous float32 tensor on ", like.device(), ", got ", t.scalar_type(),
              " on ", t.device());
  if (cols == 0) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "fused_adv::", op, ": ", name, " must have shape [", n, "], got ",
                t.sizes());
  } else {
    TORCH_CHECK(t.dim() == 2 && t.size(0) == n && t.size(1) == cols, "fused_adv::", op, ": ", name,
                " must have shape [", n, ", ", cols, "], got ", t.sizes());
  }
  return t.const_data_ptr<float>();
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
