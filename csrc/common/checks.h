// Argument checks and shape helpers shared by the CPU and CUDA kernels (host code only).
// fused_adv.ops validates every call before it reaches a kernel; these checks are the kernels'
// own contract, for direct torch.ops.fused_adv.* calls, and raise RuntimeError (TORCH_CHECK).
// Naming: see csrc/common/kernel_math.h.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <initializer_list>
#include <utility>

namespace fused_adv {
namespace common {

// The tensor lists of a multi-tensor (weight family) op: every tensor on a device of type
// `kind`, all on one device, floating dtype (float32, float64, float16, bfloat16), contiguous,
// and entry i of every list with the shape and dtype of entry i of the first list.  A device
// kernel needs a tensor to know its device, so only the CPU kernels accept empty lists.
// Returns the device of the call.
inline c10::Device check_lists(const char* op, c10::DeviceType kind,
                               std::initializer_list<std::pair<const char*, at::TensorList>> lists) {
  const auto& head = *lists.begin();
  const size_t n = head.second.size();
  TORCH_CHECK(n > 0 || kind == c10::DeviceType::CPU, "fused_adv::", op,
              ": empty tensor lists are handled by fused_adv.ops");
  const c10::Device device = n > 0 ? head.second[0].device() : c10::Device(kind);
  for (const auto& lst : lists) {
    TORCH_CHECK(lst.second.size() == n, "fused_adv::", op, ": got ", n, " ", head.first, " but ",
                lst.second.size(), " ", lst.first);
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor& t = lst.second[i];
      const at::Tensor& h = head.second[i];
      TORCH_CHECK(t.device().type() == kind, "fused_adv::", op, ": ", lst.first, "[", i, "] is on ", t.device(),
                  "; the ", kind, " kernel needs ", kind, " tensors");
      TORCH_CHECK(t.device() == device, "fused_adv::", op, ": ", lst.first, "[", i, "] is on ", t.device(), ", ",
                  head.first, "[0] on ", device, "; one call serves one device");
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
  return device;
}

// A per-tensor float32 statistics vector [n] (grad_sumsq, param_sumsq; cols == 0) or matrix
// [n, cols] (PGD stats), contiguous, on `device`.  Returns its data pointer (a device pointer
// for a CUDA call: read by the kernels, never by the host).
inline const float* check_scalars(const char* op, const char* name, const at::Tensor& t, c10::Device device,
                                  int64_t n, int64_t cols = 0) {
  TORCH_CHECK(t.device() == device && t.scalar_type() == at::kFloat && t.is_contiguous(), "fused_adv::", op, ": ",
              name, " must be a contiguous float32 tensor on ", device, ", got ", t.scalar_type(), " on ",
              t.device());
  if (cols == 0) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "fused_adv::", op, ": ", name, " must have shape [", n, "], got ",
                t.sizes());
  } else {
    TORCH_CHECK(t.dim() == 2 && t.size(0) == n && t.size(1) == cols, "fused_adv::", op, ": ", name,
                " must have shape [", n, ", ", cols, "], got ", t.sizes());
  }
  return t.const_data_ptr<float>();
}

// One input of a row-wise (activation family) op: on a device of type `kind`, contiguous.
inline void check_input(const at::Tensor& t, const char* name, c10::DeviceType kind) {
  TORCH_CHECK(t.device().type() == kind, "fused_adv (", kind, "): ", name, " is on ", t.device(), "; the ", kind,
              " kernel needs ", kind, " tensors");
  TORCH_CHECK(t.is_contiguous(), "fused_adv (", kind, "): ", name, " must be contiguous");
}

// Row view of a [..., H] tensor: H = the last dim (1 for a 0-d tensor), rows = numel / H.
inline int64_t last_dim(const at::Tensor& t) { return t.dim() ? t.size(-1) : 1; }
inline int64_t rows_of(const at::Tensor& t) {
  const int64_t h = last_dim(t);
  return h ? t.numel() / h : 0;
}

// The dtype statistics of a tensor of dtype `s` are kept in: opmath_t's at::ScalarType.
inline at::ScalarType opmath_type_of(at::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace common
}  // namespace fused_adv
