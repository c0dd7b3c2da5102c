// CUDA kernel of the `free` op family (the original FreeAT's sign step):
// TORCH_LIBRARY_IMPL(fused_adv, CUDA).
//
// freeat_update_: noise <- clamp(noise + step * sign(grad), -clip, clip), the element math of
// csrc/common/free_math.h (explicitly rounded: no FMA contraction, so the bits equal the CPU
// kernel's and the torch backend's).  One launch over the chunks of the noise tensor
// (multi_tensor_apply.cuh with one tensor), 16-byte vector accesses where both pointers are
// aligned, no host sync.
#include <torch/library.h>

#include "common/free_math.h"
#include "cuda/multi_tensor_apply.cuh"

namespace fused_adv {
namespace cuda {
namespace {

using common::freeat_step;
using common::opmath_t;

// lists: noise (updated), grad.
template <typename T>
struct FreeatFunctor {
  double step, clip;
  __device__ void operator()(const TensorListMeta<2>& meta, int t, int64_t begin, int64_t n, int64_t) const {
    using M = opmath_t<T>;
    constexpr int V = VecOf<T>::N;
    using VT = typename VecOf<T>::type;
    T* __restrict__ x = static_cast<T*>(meta.addresses[0][t]) + begin;
    const T* __restrict__ g = static_cast<const T*>(meta.addresses[1][t]) + begin;
    const M s = static_cast<M>(step), c = static_cast<M>(clip);
    const int64_t nv = (aligned16(x) && aligned16(g)) ? n / V : 0;
    for (int64_t j = threadIdx.x; j < nv; j += blockDim.x) {
      VT a = reinterpret_cast<const VT*>(x)[j];
      const VT b = reinterpret_cast<const VT*>(g)[j];
#pragma unroll
      for (int k = 0; k < V; ++k) a.v[k] = freeat_step<T>(a.v[k], b.v[k], s, c);
      reinterpret_cast<VT*>(x)[j] = a;
    }
    for (int64_t j = nv * V + threadIdx.x; j < n; j += blockDim.x) x[j] = freeat_step<T>(x[j], g[j], s, c);
  }
};

void freeat_update_cuda(const at::Tensor& noise, const at::Tensor& grad, double step, double clip) {
  common::check_lists("freeat_update_", c10::DeviceType::CUDA, {{"noise", {noise}}, {"grad", {grad}}});
  const c10::cuda::CUDAGuard guard(noise.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, noise.scalar_type(), "freeat_update_", [&] {
    multi_tensor_apply<2>({at::TensorList(noise), at::TensorList(grad)}, {0}, FreeatFunctor<scalar_t>{step, clip});
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_adv, CUDA, m) { m.impl("freeat_update_", &freeat_update_cuda); }

}  // namespace cuda
}  // namespace fused_adv
