// CUDA kernels of the activation-space ops (SiFT / FreeLB / SMART), op family "activation".
//
// The math is fused_adv/_torch/activation.py's (the executable statement of every backend);
// float math (double for double tensors), rounded once when stored.  Row-wise ops: one block per
// row (token) of H elements; reductions are fixed-shape shuffle trees (deterministic, no float
// atomics).  FreeLB: a 2-D grid (chunk, sample) writes per-chunk partials, reduced by a torch
// sum in fixed order.  Guards (‖g‖ finite) live in device memory and are read by the kernels:
// no host sync.  Everything runs on the current stream of the tensors' device.
//
// Conventions (docs/design.md §4 (Build)): no ATen/cuda/CUDAContext.h; c10/cuda headers only.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <type_traits>

#include "common/checks.h"
#include "common/kernel_math.h"

namespace fused_adv {
namespace {

using common::clamp_keep_nan;
using common::last_dim;
using common::nan_max;
using common::opmath_t;
using common::opmath_type_of;
using common::rows_of;

constexpr int kMaxThreads = 1024;

// threads per row-block: enough for ~4 elements per thread, a multiple of 32, at most 1024
int row_threads(int64_t h) {
  int64_t t = (h + 3) / 4;
  t = ((t + 31) / 32) * 32;
  return static_cast<int>(t < 32 ? 32 : (t > kMaxThreads ? kMaxThreads : t));
}

void check_cuda(const at::Tensor& t, const char* name) { common::check_input(t, name, c10::DeviceType::CUDA); }

// ---------------------------------------------------------------- reductions
template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename A>
__device__ __forceinline__ A warp_max(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = nan_max(__shfl_xor_sync(0xffffffffu, v, o), v);
  return v;
}

// block-wide sum/max; every thread gets the result; shm holds >= 32 values
template <typename A, bool kMax>
__device__ A block_reduce(A v, A* shm) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  v = kMax ? warp_max(v) : warp_sum(v);
  if (lane == 0) shm[w] = v;
  __syncthreads();
  if (w == 0) {
    A t = lane < nw ? shm[lane] : A(0);
    t = kMax ? warp_max(t) : warp_sum(t);
    if (lane == 0) shm[0] = t;
  }
  __syncthreads();
  const A r = shm[0];
  __syncthreads();  // shm may be reused right after
  return r;
}

// ---------------------------------------------------------------- kernels
template <typename T, typename A>
__global__ void ln_fwd_kernel(const T* __restrict__ x, const A* __restrict__ delta, T* __restrict__ out,
                              A* __restrict__ mean, A* __restrict__ rstd, int64_t h, A eps) {
  __shared__ A shm[32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * h;
  A s = 0;
  for (int64_t j = threadIdx.x; j < h; j += blockDim.x) s += static_cast<A>(xr[j]);
  const A mu = block_reduce<A, false>(s, shm) / static_cast<A>(h);
  A q = 0;
  for (int64_t j = threadIdx.x; j < h; j += blockDim.x) {
    const A c = static_cast<A>(xr[j]) - mu;
    q += c * c;
  }
  const A var = block_reduce<A, false>(q, shm) / static_cast<A>(h);
  const A rs = A(1) / sqrt(var + eps);
  T* orow = out + row * h;
  const A* dr = delta ? delta + row * h : nullptr;
  for (int64_t j = threadIdx.x; j < h; j += blockDim.x) {
    A y = (static_cast<A>(xr[j]) - mu) * rs;
    if (dr) y += dr[j];
    orow[j] = static_cast<T>(y);
  }
  if (threadIdx.x == 0) {
    mean[row] = mu;
    rstd[row] = rs;
  }
}

template <typename T, typename A>
__global__ void ln_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x, const A* __restrict__ mean,
                              const A* __restrict__ rstd, T* __restrict__ dx, int64_t h) {
  __shared__ A shm[32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * h;
  const T* gr = dy + row * h;
  const A mu = mean[row], rs = rstd[row];
  A sg = 0, sgx = 0;
  for (int64_t j = threadIdx.x; j < h; j += blockDim.x) {
    const A g = static_cast<A>(gr[j]);
    sg += g;
    sgx += g * ((static_cast<A>(xr[j]) - mu) * rs);
  }
  const A mg = block_reduce<A, false>(sg, shm) / static_cast<A>(h);
  const A mgx = block_reduce<A, false>(sgx, shm) / static_cast<A>(h);
  T* drow = dx + row * h;
  for (int64_t j = threadIdx.x; j < h; j += blockDim.x) {
    const A xh = (static_cast<A>(xr[j]) - mu) * rs;
    drow[j] = static_cast<T>(rs * (static_cast<A>(gr[j]) - mg - xh * mgx));
  }
}

template <typename T, typename A>
__global__ void row_stats_kernel(const T* __restrict__ x, float* __restrict__ stats, int64_t h) {
  __shared__ A shm[32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * h;
  A m = 0, s = 0;
  for (int64_t j = threadIdx.x; j < h; j += blockDim.x) {
    const A v = static_cast<A>(xr[j]);
    m = nan_max(v < A(0) ? -v : v, m);
    s += v * v;
  }
  m = block_reduce<A, true>(m, shm);
  s = block_reduce<A, false>(s, shm);
  if (threadIdx.x == 0) {
    stats[2 * row] = static_cast<float>(m);
    stats[2 * row + 1] = static_cast<float>(s);
  }
}

template <typename T, typename A>
__global__ void sift_perturb_kernel(const T* __restrict__ xhat, const float* __restrict__ noise,
                                    float* __restrict__ delta, T* __restrict__ out, int64_t n, float bound) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float d = clamp_keep_nan(noise[i], -bound, bound);
    delta[i] = d;
    out[i] = static_cast<T>(static_cast<A>(xhat[i]) + static_cast<A>(d));
  }
}

template <typename D, typename X, typename XA>
__global__ void sift_update_kernel(D* __restrict__ delta, const D* __restrict__ grad, const X* __restrict__ xhat,
                                   const float* __restrict__ stats, const int* __restrict__ ok,
                                   X* __restrict__ out, int64_t h, D lr) {
  const int64_t row = blockIdx.x;
  const bool step = *ok != 0;
  const D den = static_cast<D>(1e-6f) + static_cast<D>(stats[2 * row]);
  D* dr = delta + row * h;
  const D* gr = grad + row * h;
  const X* xr = xhat + row * h;
  X* orow = out + row * h;
  for (int64_t j = threadIdx.x; j < h; j += blockDim.x) {
    D v = dr[j];
    if (step) v = v + lr * gr[j] / den;
    dr[j] = v;
    orow[j] = static_cast<X>(static_cast<XA>(xr[j]) + static_cast<XA>(v));
  }
}

template <typename T, typename A>
__global__ void smart_update_kernel(T* __restrict__ noise, const T* __restrict__ grad, const int* __restrict__ ok,
                                    int64_t h, A step, A eps) {
  __shared__ A shm[32];
  if (*ok == 0) return;  // uniform across the grid: no divergence around the block reduction
  const int64_t row = blockIdx.x;
  T* nr = noise + row * h;
  const T* gr = grad + row * h;
  A m = 0;
  for (int64_t j = threadIdx.x; j < h; j += blockDim.x) {
    const A v = static_cast<A>(nr[j]) + static_cast<A>(gr[j]) * step;
    m = nan_max(v < A(0) ? -v : v, m);
  }
  const A den = block_reduce<A, true>(m, shm) + eps;
  for (int64_t j = threadIdx.x; j < h; j += blockDim.x)
    nr[j] = static_cast<T>((static_cast<A>(nr[j]) + static_cast<A>(gr[j]) * step) / den);
}

constexpr int kFreeLBThreads = 256;
constexpr int64_t kChunkSize = 8192;  // elements per (chunk, sample) block

template <typename T, typename A>
__global__ void freelb_reduce_kernel(const T* __restrict__ delta, const T* __restrict__ grad, A* __restrict__ part,
                                     int64_t n, int64_t nchunk, bool linf) {
  __shared__ A shm[32];
  const int64_t c = blockIdx.x, s = blockIdx.y;
  const int64_t lo = c * kChunkSize, hi = min(n, lo + kChunkSize);
  const T* ds = delta + s * n;
  const T* gs = grad + s * n;
  A* pp = part + 3 * (s * nchunk + c);
  if (linf) {
    A m = 0;
    for (int64_t j = lo + threadIdx.x; j < hi; j += blockDim.x) {
      const A g = static_cast<A>(gs[j]);
      m = nan_max(g < A(0) ? -g : g, m);
    }
    m = block_reduce<A, true>(m, shm);
    if (threadIdx.x == 0) {
      pp[0] = m;
      pp[1] = 0;
      pp[2] = 0;
    }
  } else {
    A gg = 0, dg = 0, dd = 0;
    for (int64_t j = lo + threadIdx.x; j < hi; j += blockDim.x) {
      const A g = static_cast<A>(gs[j]), d = static_cast<A>(ds[j]);
      gg += g * g;
      dg += d * g;
      dd += d * d;
    }
    gg = block_reduce<A, false>(gg, shm);
    dg = block_reduce<A, false>(dg, shm);
    dd = block_reduce<A, false>(dd, shm);
    if (threadIdx.x == 0) {
      pp[0] = gg;
      pp[1] = dg;
      pp[2] = dd;
    }
  }
}

template <typename T, typename A>
__global__ void freelb_update_kernel(T* __restrict__ delta, const T* __restrict__ grad, const float* __restrict__ stats,
                                     int64_t n, A lr, A max_norm, bool linf) {
  const int64_t c = blockIdx.x, s = blockIdx.y;
  const int64_t lo = c * kChunkSize, hi = min(n, lo + kChunkSize);
  T* ds = delta + s * n;
  const T* gs = grad + s * n;
  const A s0 = static_cast<A>(stats[3 * s]);
  const bool project = max_norm > A(0);
  A den, r = 1;
  if (linf) {
    den = s0 < A(1e-8f) ? A(1e-8f) : s0;  // keeps NaN, as torch.clamp
  } else {
    const A gn = sqrt(s0);
    den = gn < A(1e-8f) ? A(1e-8f) : gn;
    if (project) {
      const A s1 = static_cast<A>(stats[3 * s + 1]), s2 = static_cast<A>(stats[3 * s + 2]);
      const A cc = lr / den;
      A sq = s2 + 2 * cc * s1 + cc * cc * s0;  // ‖d + c g‖², analytically
      sq = sq < A(0) ? A(0) : sq;
      const A dn = sqrt(sq);
      const A exceed = dn > max_norm ? A(1) : A(0);
      r = max_norm / dn * exceed + (1 - exceed);  // NaN when dn == 0, as the original
    }
  }
  for (int64_t j = lo + threadIdx.x; j < hi; j += blockDim.x) {
    A v = static_cast<A>(ds[j]) + lr * static_cast<A>(gs[j]) / den;
    if (project) v = linf ? clamp_keep_nan(v, -max_norm, max_norm) : v * r;
    ds[j] = static_cast<T>(v);
  }
}

// ---------------------------------------------------------------- launchers
at::Tensor grad_ok(const at::Tensor& stats) {
  // ‖g‖ finite <=> the sum of the per-row squares is finite; stays on the device
  return at::isfinite(stats.select(1, 1).sum()).to(at::kInt).reshape({1});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ln_delta_fwd_cuda(const at::Tensor& x,
                                                                 const c10::optional<at::Tensor>& delta,
                                                                 double eps) {
  check_cuda(x, "x");
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t h = last_dim(x), rows = rows_of(x);
  const auto acc = opmath_type_of(x.scalar_type());
  auto out = at::empty_like(x);
  auto mean = at::empty({rows}, x.options().dtype(acc));
  auto rstd = at::empty({rows}, x.options().dtype(acc));
  const bool has_delta = delta.has_value() && delta->defined();
  at::Tensor d;
  if (has_delta) d = delta->to(acc).contiguous();
  if (rows == 0) return {out, mean, rstd};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ln_delta_fwd_cuda", [&] {
    using A = opmath_t<scalar_t>;
    ln_fwd_kernel<scalar_t, A><<<static_cast<unsigned>(rows), row_threads(h), 0, stream>>>(
        x.data_ptr<scalar_t>(), has_delta ? d.data_ptr<A>() : nullptr, out.data_ptr<scalar_t>(),
        mean.data_ptr<A>(), rstd.data_ptr<A>(), h, static_cast<A>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, mean, rstd};
}

at::Tensor ln_delta_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean,
                             const at::Tensor& rstd) {
  check_cuda(x, "x");
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t h = last_dim(x), rows = rows_of(x);
  const auto acc = opmath_type_of(x.scalar_type());
  auto g = grad_out.to(x.scalar_type()).contiguous();
  auto mu = mean.to(acc).contiguous();
  auto rs = rstd.to(acc).contiguous();
  auto dx = at::empty_like(x);
  if (rows == 0) return dx;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ln_delta_bwd_cuda", [&] {
    using A = opmath_t<scalar_t>;
    ln_bwd_kernel<scalar_t, A><<<static_cast<unsigned>(rows), row_threads(h), 0, stream>>>(
        g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), mu.data_ptr<A>(), rs.data_ptr<A>(),
        dx.data_ptr<scalar_t>(), h);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dx;
}

at::Tensor row_absmax_sumsq_cuda(const at::Tensor& x) {
  check_cuda(x, "x");
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t h = last_dim(x), rows = rows_of(x);
  auto stats = at::empty({rows, 2}, x.options().dtype(at::kFloat));
  if (rows == 0) return stats;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "row_absmax_sumsq_cuda", [&] {
    using A = opmath_t<scalar_t>;
    row_stats_kernel<scalar_t, A><<<static_cast<unsigned>(rows), row_threads(h), 0, stream>>>(
        x.data_ptr<scalar_t>(), stats.data_ptr<float>(), h);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return stats;
}

std::tuple<at::Tensor, at::Tensor> sift_perturb_cuda(const at::Tensor& xhat, const at::Tensor& noise, double bound) {
  check_cuda(xhat, "xhat");
  c10::cuda::CUDAGuard guard(xhat.device());
  auto nz = noise.to(at::kFloat).contiguous();
  auto delta = at::empty(xhat.sizes(), xhat.options().dtype(at::kFloat));
  auto out = at::empty_like(xhat);
  const int64_t n = xhat.numel();
  if (n == 0) return {delta, out};
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, 65535);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xhat.scalar_type(), "sift_perturb_cuda", [&] {
    using A = opmath_t<scalar_t>;
    sift_perturb_kernel<scalar_t, A><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
        xhat.data_ptr<scalar_t>(), nz.data_ptr<float>(), delta.data_ptr<float>(), out.data_ptr<scalar_t>(), n,
        static_cast<float>(bound));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {delta, out};
}

at::Tensor sift_update_cuda(const at::Tensor& delta, const at::Tensor& grad, const at::Tensor& xhat,
                            const at::Tensor& stats, double lr) {
  check_cuda(delta, "delta");
  TORCH_CHECK(delta.scalar_type() == at::kFloat || delta.scalar_type() == at::kDouble,
              "fused_adv: sift_update_ needs a float32/float64 delta");
  c10::cuda::CUDAGuard guard(delta.device());
  const int64_t h = last_dim(delta), rows = rows_of(delta);
  auto g = grad.contiguous();
  auto xh = xhat.contiguous();
  auto st = stats.contiguous();
  auto out = at::empty_like(xh);
  if (rows == 0) return out;
  auto ok = grad_ok(st);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(delta.scalar_type(), "sift_update_cuda", [&] {
    using D = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xh.scalar_type(), "sift_update_out_cuda", [&] {
      using X = scalar_t;
      sift_update_kernel<D, X, opmath_t<X>><<<static_cast<unsigned>(rows), row_threads(h), 0, stream>>>(
          delta.data_ptr<D>(), g.data_ptr<D>(), xh.data_ptr<X>(), st.data_ptr<float>(), ok.data_ptr<int>(),
          out.data_ptr<X>(), h, static_cast<D>(lr));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

at::Tensor smart_update_cuda(const at::Tensor& noise, const at::Tensor& grad, const at::Tensor& stats,
                             double step_size, double epsilon) {
  check_cuda(noise, "noise");
  c10::cuda::CUDAGuard guard(noise.device());
  const int64_t h = last_dim(noise), rows = rows_of(noise);
  auto g = grad.contiguous();
  auto ok = grad_ok(stats.contiguous());
  if (rows > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, noise.scalar_type(), "smart_update_cuda", [&] {
      using A = opmath_t<scalar_t>;
      smart_update_kernel<scalar_t, A><<<static_cast<unsigned>(rows), row_threads(h), 0, stream>>>(
          noise.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), ok.data_ptr<int>(), h, static_cast<A>(step_size),
          static_cast<A>(epsilon));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return ok.reshape({}).to(at::kFloat);
}

at::Tensor freelb_reduce_cuda(const at::Tensor& delta, const at::Tensor& grad, bool linf) {
  check_cuda(delta, "delta");
  c10::cuda::CUDAGuard guard(delta.device());
  const int64_t b = delta.dim() ? delta.size(0) : 1;
  const int64_t n = b ? delta.numel() / b : 0;
  if (b == 0 || n == 0) return at::zeros({b, 3}, delta.options().dtype(at::kFloat));
  auto g = grad.contiguous();
  const int64_t nchunk = (n + kChunkSize - 1) / kChunkSize;
  TORCH_CHECK(b <= 65535, "fused_adv (cuda): freelb_reduce supports at most 65535 samples");
  const auto acc = opmath_type_of(delta.scalar_type());
  auto part = at::empty({b, nchunk, 3}, delta.options().dtype(acc));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, delta.scalar_type(), "freelb_reduce_cuda", [&] {
    using A = opmath_t<scalar_t>;
    dim3 grid(static_cast<unsigned>(nchunk), static_cast<unsigned>(b));
    freelb_reduce_kernel<scalar_t, A><<<grid, kFreeLBThreads, 0, stream>>>(
        delta.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), part.data_ptr<A>(), n, nchunk, linf);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (linf) {
    auto stats = at::zeros({b, 3}, delta.options().dtype(acc));
    stats.select(1, 0).copy_(std::get<0>(part.select(2, 0).max(1)));  // NaN-propagating
    return stats.to(at::kFloat);
  }
  return part.sum(1).to(at::kFloat);  // fixed-order reduction: deterministic
}

void freelb_update_cuda(const at::Tensor& delta, const at::Tensor& grad, const at::Tensor& stats, double lr,
                        double max_norm, bool linf) {
  check_cuda(delta, "delta");
  c10::cuda::CUDAGuard guard(delta.device());
  const int64_t b = delta.dim() ? delta.size(0) : 1;
  const int64_t n = b ? delta.numel() / b : 0;
  if (b == 0 || n == 0) return;
  TORCH_CHECK(b <= 65535, "fused_adv (cuda): freelb_update_ supports at most 65535 samples");
  auto g = grad.contiguous();
  auto st = stats.contiguous();
  const int64_t nchunk = (n + kChunkSize - 1) / kChunkSize;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, delta.scalar_type(), "freelb_update_cuda", [&] {
    using A = opmath_t<scalar_t>;
    dim3 grid(static_cast<unsigned>(nchunk), static_cast<unsigned>(b));
    freelb_update_kernel<scalar_t, A><<<grid, kFreeLBThreads, 0, stream>>>(
        delta.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), st.data_ptr<float>(), n, static_cast<A>(lr),
        static_cast<A>(max_norm), linf);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_adv, CUDA, m) {
  m.impl("ln_delta_fwd", &ln_delta_fwd_cuda);
  m.impl("ln_delta_bwd", &ln_delta_bwd_cuda);
  m.impl("row_absmax_sumsq", &row_absmax_sumsq_cuda);
  m.impl("sift_perturb", &sift_perturb_cuda);
  m.impl("sift_update_", &sift_update_cuda);
  m.impl("smart_update_", &smart_update_cuda);
  m.impl("freelb_reduce", &freelb_reduce_cuda);
  m.impl("freelb_update_", &freelb_update_cuda);
}

}  // namespace fused_adv
