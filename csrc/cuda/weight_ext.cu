// CUDA kernels of the weight_ext ops (MI-FGSM, the AWP paper's perturb/restore):
// TORCH_LIBRARY_IMPL(fused_adv, CUDA).
//
// Same math as fused_adv/_torch/weight_ext.py and csrc/cpu/weight_ext.cpp, element for element;
// factors and element steps are csrc/common/weight_ext_math.h's (explicitly rounded: no FMA
// contraction, so results equal the CPU kernels').  As csrc/cuda/weight.cu: per-tensor factors
// and guards computed on the device in every block from the float32 statistics (no host sync);
// reductions fp32 (fp64 for double) per thread, a fixed shuffle tree per block, one partial per
// block, a fixed-order finish per tensor (deterministic, no atomics); backups are plain loads and
// stores of the element bits.  Launch bookkeeping: multi_tensor_apply.cuh.
#include <torch/library.h>

#include "common/weight_ext_math.h"
#include "cuda/multi_tensor_apply.cuh"

namespace fused_adv {
namespace cuda {
namespace {

using common::awp_paper_factor;
using common::awp_paper_step;
using common::mifgsm_momentum;
using common::mifgsm_param;
using common::norm_ok;
using common::opmath_t;

template <typename T, int DEPTH>
__device__ inline T* entry(const TensorListMeta<DEPTH>& meta, int list, int t, int64_t begin) {
  return static_cast<T*>(meta.addresses[list][t]) + begin;
}

// ||X||_1 partials, one per block slot.
template <typename T>
struct AbssumFunctor {
  float* partials;
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
      for (int k = 0; k < V; ++k) acc += common::abs_(static_cast<M>(a.v[k]));
    }
    for (int64_t j = nv * V + threadIdx.x; j < n; j += blockDim.x) acc += common::abs_(static_cast<M>(x[j]));
    float v[1] = {static_cast<float>(acc)};
    block_sum<1>(v);
    if (threadIdx.x == 0) partials[slot] = v[0];
  }
};

// One MI-FGSM step over a chunk: lists P, G, M, B.
template <typename T>
struct MifgsmFunctor {
  const float* grad_abssum;  // [N] on the device
  double alpha, epsilon, decay;
  bool first;
  __device__ void operator()(const TensorListMeta<4>& meta, int t, int64_t begin, int64_t n, int64_t) const {
    using M = opmath_t<T>;
    const float n1 = grad_abssum[meta.index[t]];
    const bool ok = norm_ok(n1);  // decided on the device, per tensor
    T* __restrict__ p = entry<T>(meta, 0, t, begin);
    const T* __restrict__ g = entry<T>(meta, 1, t, begin);
    T* __restrict__ m = entry<T>(meta, 2, t, begin);
    T* __restrict__ b = entry<T>(meta, 3, t, begin);
    const M nm = static_cast<M>(n1), a = static_cast<M>(alpha), e = static_cast<M>(epsilon),
            d = static_cast<M>(decay);
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      const T pv = p[j];
      if (first) b[j] = pv;  // every tensor, guarded or not (bit-exact)
      if (!ok) {             // skipped: P and M unchanged; a first step's momentum starts at 0
        if (first) m[j] = T(0);
        continue;
      }
      const T mt = mifgsm_momentum<T>(g[j], first ? T(0) : m[j], nm, d, first);
      m[j] = mt;
      p[j] = mifgsm_param<T>(pv, mt, first ? pv : b[j], a, e);
    }
  }
};

// P <- P + coeff * round(f * D): lists P, D.
template <typename T>
struct AwpPaperFunctor {
  const float* param_sumsq;  // [N]
  const float* dir_sumsq;    // [N]
  float scale;
  double coeff;
  __device__ void operator()(const TensorListMeta<2>& meta, int t, int64_t begin, int64_t n, int64_t) const {
    using M = opmath_t<T>;
    const int64_t i = meta.index[t];
    const M f = static_cast<M>(awp_paper_factor(param_sumsq[i], dir_sumsq[i], scale));
    const M c = static_cast<M>(coeff);
    T* __restrict__ p = entry<T>(meta, 0, t, begin);
    const T* __restrict__ d = entry<T>(meta, 1, t, begin);
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) p[j] = awp_paper_step<T>(p[j], d[j], f, c);
  }
};

// ---- host side ---------------------------------------------------------------------------
void check_lists(const char* op, std::initializer_list<std::pair<const char*, at::TensorList>> lists) {
  common::check_lists(op, c10::DeviceType::CUDA, lists);
}
const float* check_scalars(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like, int64_t n) {
  return common::check_scalars(op, name, t, like.device(), n);
}

// Tensor indices grouped by dtype, groups in order of first appearance (reduction slots follow
// this order), as in weight.cu.
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

#define FUSED_ADV_DISPATCH(ST, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ST, "fused_adv_cuda", __VA_ARGS__)

at::Tensor multi_tensor_abssum_cuda(at::TensorList tensors) {
  check_lists("multi_tensor_abssum", {{"tensors", tensors}});
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  const auto groups = dtype_groups(tensors);
  std::vector<int64_t> base(tensors.size(), 0), count(tensors.size(), 0);
  int64_t slots = 0;
  for (const auto& g : groups) {
    for (const int64_t i : g.second) {
      base[i] = slots;
      count[i] = chunks_of(tensors[i].numel());
      slots += count[i];
    }
  }
  const auto opts = tensors[0].options().dtype(at::kFloat);
  at::Tensor partials = at::empty({std::max<int64_t>(slots, 1)}, opts);
  int64_t slot = 0;
  for (const auto& g : groups) {
    FUSED_ADV_DISPATCH(g.first, [&] {
      slot = multi_tensor_apply<1>({tensors}, g.second, AbssumFunctor<scalar_t>{partials.data_ptr<float>()}, slot);
    });
  }
  at::Tensor out = at::empty({static_cast<int64_t>(tensors.size())}, opts);
  finish<1>(partials, out, base, count);
  return out;
}

void mifgsm_perturb_cuda(at::TensorList params, at::TensorList grads, at::TensorList momenta, at::TensorList backups,
                         const at::Tensor& grad_abssum, double alpha, double epsilon, double decay, bool first) {
  check_lists("mifgsm_perturb_", {{"params", params}, {"grads", grads}, {"momenta", momenta}, {"backups", backups}});
  const c10::cuda::CUDAGuard guard(params[0].device());
  const float* n1 = check_scalars("mifgsm_perturb_", "grad_abssum", grad_abssum, params[0], params.size());
  for (const auto& g : dtype_groups(params)) {
    FUSED_ADV_DISPATCH(g.first, [&] {
      multi_tensor_apply<4>({params, grads, momenta, backups}, g.second,
                            MifgsmFunctor<scalar_t>{n1, alpha, epsilon, decay, first});
    });
  }
}

void awp_paper_add_cuda(at::TensorList params, at::TensorList dirs, const at::Tensor& param_sumsq,
                        const at::Tensor& dir_sumsq, double scale, double coeff) {
  check_lists("awp_paper_add_", {{"params", params}, {"dirs", dirs}});
  const c10::cuda::CUDAGuard guard(params[0].device());
  const float* wsq = check_scalars("awp_paper_add_", "param_sumsq", param_sumsq, params[0], params.size());
  const float* dsq = check_scalars("awp_paper_add_", "dir_sumsq", dir_sumsq, params[0], params.size());
  for (const auto& g : dtype_groups(params)) {
    FUSED_ADV_DISPATCH(g.first, [&] {
      multi_tensor_apply<2>({params, dirs}, g.second,
                            AwpPaperFunctor<scalar_t>{wsq, dsq, static_cast<float>(scale), coeff});
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_adv, CUDA, m) {
  m.impl("multi_tensor_abssum", &multi_tensor_abssum_cuda);
  m.impl("mifgsm_perturb_", &mifgsm_perturb_cuda);
  m.impl("awp_paper_add_", &awp_paper_add_cuda);
}

}  // namespace cuda
}  // namespace fused_adv
