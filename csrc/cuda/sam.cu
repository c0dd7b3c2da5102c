// CUDA kernels of the sam ops (SAM / ASAM): TORCH_LIBRARY_IMPL(fused_adv, CUDA).
//
// Same math as fused_adv/_torch/sam.py and csrc/cpu/sam.cpp, element for element; the factor and
// element step are csrc/common/sam_math.h's (explicitly rounded: no FMA contraction, so results
// equal the CPU kernels').  sam_sumsq: fp32 (fp64 for double) per thread, a fixed shuffle tree per
// block, one partial per block, a fixed-order finish per tensor (deterministic, no atomics).
// sam_perturb_: every block combines the WHOLE grad_sumsq vector into the one global norm on the
// device (float64, fixed per-thread order and a fixed tree: every block gets the same bits), so
// no host sync and no extra launch; backups are plain loads and stores of the element bits.
// Launch bookkeeping: multi_tensor_apply.cuh.
#include <torch/library.h>

#include <algorithm>

#include "common/sam_math.h"
#include "cuda/multi_tensor_apply.cuh"

namespace fused_adv {
namespace cuda {
namespace {

using common::opmath_t;
using common::sam_scale;
using common::sam_step;
using common::sam_term;

template <typename T, int DEPTH>
__device__ inline T* entry(const TensorListMeta<DEPTH>& meta, int list, int t, int64_t begin) {
  return static_cast<T*>(meta.addresses[list][t]) + begin;
}

// Partials of sum(sam_term^2), one per block slot: lists P, G.
template <typename T, bool ADAPTIVE>
struct SamSumsqFunctor {
  float* partials;
  __device__ void operator()(const TensorListMeta<2>& meta, int t, int64_t begin, int64_t n, int64_t slot) const {
    using M = opmath_t<T>;
    const T* p = entry<T>(meta, 0, t, begin);
    const T* g = entry<T>(meta, 1, t, begin);
    M acc = 0;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      const M v = sam_term<ADAPTIVE, T>(ADAPTIVE ? p[j] : T(0), g[j]);
      acc += v * v;
    }
    float v[1] = {static_cast<float>(acc)};
    block_sum<1>(v);
    if (threadIdx.x == 0) partials[slot] = v[0];
  }
};

// The float32 rounding of the float64 sum of x[0..m), the same bits in every block: each thread
// sums a fixed stride, then a fixed tree over the block.
__device__ inline float global_sum(const float* __restrict__ x, int64_t m) {
  __shared__ double part[kBlockThreads];
  double s = 0;
  for (int64_t k = threadIdx.x; k < m; k += blockDim.x) s += static_cast<double>(x[k]);
  part[threadIdx.x] = s;
  __syncthreads();
  for (int w = kBlockThreads / 2; w > 0; w /= 2) {
    if (threadIdx.x < w) part[threadIdx.x] += part[threadIdx.x + w];
    __syncthreads();
  }
  const float total = static_cast<float>(part[0]);
  __syncthreads();  // part may be reused by the next call in this block
  return total;
}

// B <- P; P <- P + ((P*P)*G if ADAPTIVE else G) * scale when the global norm is finite: lists P, G, B.
template <typename T, bool ADAPTIVE>
struct SamPerturbFunctor {
  const float* grad_sumsq;  // [M] on the device
  int64_t m;
  float rho;
  __device__ void operator()(const TensorListMeta<3>& meta, int t, int64_t begin, int64_t n, int64_t) const {
    using M = opmath_t<T>;
    const auto f = sam_scale(global_sum(grad_sumsq, m), rho);  // decided on the device
    T* __restrict__ p = entry<T>(meta, 0, t, begin);
    const T* __restrict__ g = entry<T>(meta, 1, t, begin);
    T* __restrict__ b = entry<T>(meta, 2, t, begin);
    const M s = static_cast<M>(f.scale);
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      const T pv = p[j];
      b[j] = pv;  // every tensor, guarded or not (bit-exact)
      if (f.ok) p[j] = sam_step<ADAPTIVE, T>(pv, g[j], s);
    }
  }
};

// ---- host side ---------------------------------------------------------------------------
void check_lists(const char* op, std::initializer_list<std::pair<const char*, at::TensorList>> lists) {
  common::check_lists(op, c10::DeviceType::CUDA, lists);
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

at::Tensor sam_sumsq_cuda(at::TensorList params, at::TensorList grads, bool adaptive) {
  check_lists("sam_sumsq", {{"params", params}, {"grads", grads}});
  const c10::cuda::CUDAGuard guard(params[0].device());
  const auto groups = dtype_groups(params);
  std::vector<int64_t> base(params.size(), 0), count(params.size(), 0);
  int64_t slots = 0;
  for (const auto& g : groups) {
    for (const int64_t i : g.second) {
      base[i] = slots;
      count[i] = chunks_of(params[i].numel());
      slots += count[i];
    }
  }
  const auto opts = params[0].options().dtype(at::kFloat);
  at::Tensor partials = at::empty({std::max<int64_t>(slots, 1)}, opts);
  int64_t slot = 0;
  for (const auto& g : groups) {
    FUSED_ADV_DISPATCH(g.first, [&] {
      if (adaptive) {
        slot = multi_tensor_apply<2>({params, grads}, g.second,
                                     SamSumsqFunctor<scalar_t, true>{partials.data_ptr<float>()}, slot);
      } else {
        slot = multi_tensor_apply<2>({params, grads}, g.second,
                                     SamSumsqFunctor<scalar_t, false>{partials.data_ptr<float>()}, slot);
      }
    });
  }
  at::Tensor out = at::empty({static_cast<int64_t>(params.size())}, opts);
  finish<1>(partials, out, base, count);
  return out;
}

void sam_perturb_cuda(at::TensorList params, at::TensorList grads, at::TensorList backups,
                      const at::Tensor& grad_sumsq, double rho, bool adaptive) {
  check_lists("sam_perturb_", {{"params", params}, {"grads", grads}, {"backups", backups}});
  const c10::cuda::CUDAGuard guard(params[0].device());
  TORCH_CHECK(grad_sumsq.dim() == 1, "fused_adv::sam_perturb_: grad_sumsq must be a vector, got ",
              grad_sumsq.sizes());
  const int64_t m = grad_sumsq.size(0);
  const float* gsq = common::check_scalars("sam_perturb_", "grad_sumsq", grad_sumsq, params[0].device(), m);
  const float r = static_cast<float>(rho);
  for (const auto& g : dtype_groups(params)) {
    FUSED_ADV_DISPATCH(g.first, [&] {
      if (adaptive) {
        multi_tensor_apply<3>({params, grads, backups}, g.second, SamPerturbFunctor<scalar_t, true>{gsq, m, r});
      } else {
        multi_tensor_apply<3>({params, grads, backups}, g.second, SamPerturbFunctor<scalar_t, false>{gsq, m, r});
      }
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_adv, CUDA, m) {
  m.impl("sam_sumsq", &sam_sumsq_cuda);
  m.impl("sam_perturb_", &sam_perturb_cuda);
}

}  // namespace cuda
}  // namespace fused_adv
