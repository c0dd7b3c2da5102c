// CPU kernel of the `free` op family (the original FreeAT's sign step):
// TORCH_LIBRARY_IMPL(fused_adv, CPU).
//
// freeat_update_: noise <- clamp(noise + step * sign(grad), -clip, clip), the element math of
// csrc/common/free_math.h (shared with csrc/cuda/free.cu; stated in fused_adv/_torch/free.py).
// One pass over fixed-size chunks in one parallel region (multi_tensor.h), so a BERT-sized noise
// buffer keeps both cores busy and a small one runs on the calling thread.
#include <torch/library.h>

#include <type_traits>

#include "common/free_math.h"
#include "cpu/multi_tensor.h"
#include "cpu/vec.h"

namespace fused_adv {
namespace cpu {
namespace {

using common::freeat_step;
using common::opmath_t;

void freeat_update_cpu(const at::Tensor& noise, const at::Tensor& grad, double step, double clip) {
  common::check_lists("freeat_update_", c10::DeviceType::CPU, {{"noise", {noise}}, {"grad", {grad}}});
  const auto plan = plan_chunks({noise});
  dispatch_float(noise.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using M = opmath_t<T>;
    T* np_ = static_cast<T*>(noise.data_ptr());
    const T* gp = grad.const_data_ptr<T>();
    const M s = static_cast<M>(step), c = static_cast<M>(clip);
    for_each_chunk(plan, [&](int64_t, const Chunk& ch) {
      vec::with_width([&](auto) {  // the loops below in AVX2 code on AVX2 CPUs (vec.h): same bits
        T* __restrict__ n = np_ + ch.begin;
        const T* __restrict__ g = gp + ch.begin;
        const int64_t len = ch.end - ch.begin;
        for (int64_t j = 0; j < len; ++j) n[j] = freeat_step<T>(n[j], g[j], s, c);
      });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_adv, CPU, m) { m.impl("freeat_update_", &freeat_update_cpu); }

}  // namespace cpu
}  // namespace fused_adv
