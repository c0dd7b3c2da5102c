// CPU kernels of the activation-space ops (SiFT / FreeLB / SMART), op family "activation".
//
// The math is fused_adv/_torch/activation.py's (the executable statement of every backend):
// element math in float (double for double tensors), rounded once when stored; NaN/Inf guards
// computed here, on the tensors' device.  Row-wise ops run one row (token, H elements) per
// iteration of at::parallel_for; each row is read from cache on its second pass.  Reductions use
// a fixed number of partial accumulators (vectorisable, and the order never depends on the
// thread count: deterministic).  FreeLB's per-sample sums combine per-chunk partials in double.
// Each parallel chunk runs inside vec::with_width (csrc/cpu/vec.h): on AVX2 CPUs the compiler
// vectorises these loops 8 wide (lane by lane, no reassociation, no FMA: the same bits).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "common/kernel_math.h"
#include "cpu/vec.h"

namespace fused_adv {
namespace {

using common::clamp_keep_nan;
using common::last_dim;
using common::nan_max;
using common::opmath_t;
using common::opmath_type_of;
using common::rows_of;

constexpr int kLanes = 8;  // partial accumulators per reduction

int64_t grain_rows(int64_t h) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(h, 1)); }

// sum_j f(j) over [0, n) with kLanes partial sums (fixed order)
template <typename A, typename F>
inline A lane_sum(int64_t n, F f) {
  A part[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) part[l] += f(j + l);
  for (; j < n; ++j) part[0] += f(j);
  A s = 0;
  for (int l = 0; l < kLanes; ++l) s += part[l];
  return s;
}

void check_cpu(const at::Tensor& t, const char* name) { common::check_input(t, name, c10::DeviceType::CPU); }

// ---------------------------------------------------------------- LayerNorm (+ delta)
std::tuple<at::Tensor, at::Tensor, at::Tensor> ln_delta_fwd_cpu(const at::Tensor& x,
                                                                const c10::optional<at::Tensor>& delta,
                                                                double eps) {
  check_cpu(x, "x");
  const int64_t h = last_dim(x), rows = rows_of(x);
  const auto acc = opmath_type_of(x.scalar_type());
  auto out = at::empty_like(x);
  auto mean = at::empty({rows}, x.options().dtype(acc));
  auto rstd = at::empty({rows}, x.options().dtype(acc));
  at::Tensor d;
  const bool has_delta = delta.has_value() && delta->defined();
  if (has_delta) {
    TORCH_CHECK(delta->sizes() == x.sizes(), "fused_adv: delta must have x's shape");
    d = delta->to(acc).contiguous();  // no copy for the usual float32 delta
  }
  if (rows == 0) return {out, mean, rstd};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ln_delta_fwd", [&] {
    using A = opmath_t<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const A* dp = has_delta ? d.data_ptr<A>() : nullptr;
    A* mp = mean.data_ptr<A>();
    A* rp = rstd.data_ptr<A>();
    at::parallel_for(0, rows, grain_rows(h), [&](int64_t r0, int64_t r1) {
      cpu::vec::with_width([&](auto) {  // the loops below in AVX2 code on AVX2 CPUs (vec.h): same bits
        for (int64_t r = r0; r < r1; ++r) {
          const scalar_t* xr = xp + r * h;
          const A mu = lane_sum<A>(h, [&](int64_t j) { return static_cast<A>(xr[j]); }) / h;
          const A var = lane_sum<A>(h, [&](int64_t j) {
                          const A c = static_cast<A>(xr[j]) - mu;
                          return c * c;
                        }) / h;
          const A rs = A(1) / std::sqrt(var + static_cast<A>(eps));
          scalar_t* orow = op + r * h;
          if (dp) {
            const A* dr = dp + r * h;
            for (int64_t j = 0; j < h; ++j) orow[j] = static_cast<scalar_t>((static_cast<A>(xr[j]) - mu) * rs + dr[j]);
          } else {
            for (int64_t j = 0; j < h; ++j) orow[j] = static_cast<scalar_t>((static_cast<A>(xr[j]) - mu) * rs);
          }
          mp[r] = mu;
          rp[r] = rs;
        }
      });
    });
  });
  return {out, mean, rstd};
}

at::Tensor ln_delta_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean,
                            const at::Tensor& rstd) {
  check_cpu(x, "x");
  const int64_t h = last_dim(x), rows = rows_of(x);
  const auto acc = opmath_type_of(x.scalar_type());
  auto g = grad_out.to(x.scalar_type()).contiguous();
  auto mu_t = mean.to(acc).contiguous();
  auto rs_t = rstd.to(acc).contiguous();
  if (rows > 0 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble)) {
    // same statement, and ATen's CPU kernel is vectorised for the machine it runs on (this
    // extension is built for the baseline ISA): 2.4x faster than the loop below at [1024, 384]
    std::vector<int64_t> stat_shape(x.sizes().begin(), x.sizes().end());
    stat_shape.back() = 1;
    return std::get<0>(at::native_layer_norm_backward(g, x, {h}, mu_t.view(stat_shape), rs_t.view(stat_shape),
                                                      {}, {}, {true, false, false}));
  }
  auto dx = at::empty_like(x);
  if (rows == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ln_delta_bwd", [&] {
    using A = opmath_t<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const A* mp = mu_t.data_ptr<A>();
    const A* rp = rs_t.data_ptr<A>();
    scalar_t* dp = dx.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_rows(h), [&](int64_t r0, int64_t r1) {
      cpu::vec::with_width([&](auto) {  // the loops below in AVX2 code on AVX2 CPUs (vec.h): same bits
        for (int64_t r = r0; r < r1; ++r) {
          const scalar_t* xr = xp + r * h;
          const scalar_t* gr = gp + r * h;
          const A mu = mp[r], rs = rp[r];
          A sg[kLanes] = {}, sgx[kLanes] = {};
          int64_t j0 = 0;
          for (; j0 + kLanes <= h; j0 += kLanes) {
            for (int l = 0; l < kLanes; ++l) {
              const A gv = static_cast<A>(gr[j0 + l]);
              sg[l] += gv;
              sgx[l] += gv * ((static_cast<A>(xr[j0 + l]) - mu) * rs);
            }
          }
          for (; j0 < h; ++j0) {
            const A gv = static_cast<A>(gr[j0]);
            sg[0] += gv;
            sgx[0] += gv * ((static_cast<A>(xr[j0]) - mu) * rs);
          }
          A tg = 0, tgx = 0;
          for (int l = 0; l < kLanes; ++l) {
            tg += sg[l];
            tgx += sgx[l];
          }
          const A mg = tg / h, mgx = tgx / h;
          scalar_t* drow = dp + r * h;
          for (int64_t j = 0; j < h; ++j) {
            const A xh = (static_cast<A>(xr[j]) - mu) * rs;
            drow[j] = static_cast<scalar_t>(rs * (static_cast<A>(gr[j]) - mg - xh * mgx));
          }
        }
      });
    });
  });
  return dx;
}

// ---------------------------------------------------------------- per-row statistics
at::Tensor row_absmax_sumsq_cpu(const at::Tensor& x) {
  check_cpu(x, "x");
  const int64_t h = last_dim(x), rows = rows_of(x);
  auto stats = at::empty({rows, 2}, x.options().dtype(at::kFloat));
  if (rows == 0) return stats;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "row_absmax_sumsq", [&] {
    using A = opmath_t<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    float* sp = stats.data_ptr<float>();
    at::parallel_for(0, rows, grain_rows(h), [&](int64_t r0, int64_t r1) {
      cpu::vec::with_width([&](auto) {  // the loops below in AVX2 code on AVX2 CPUs (vec.h): same bits
        for (int64_t r = r0; r < r1; ++r) {
          const scalar_t* xr = xp + r * h;
          // kLanes independent (max, sum) accumulators: vectorisable, fixed order
          A m[kLanes] = {}, q[kLanes] = {};
          int64_t j = 0;
          for (; j + kLanes <= h; j += kLanes) {
            for (int l = 0; l < kLanes; ++l) {
              const A v = static_cast<A>(xr[j + l]);
              m[l] = std::max(m[l], std::abs(v));  // maxps/andps: vectorises (NaN is flagged below)
              q[l] += v * v;
            }
          }
          for (; j < h; ++j) {
            const A v = static_cast<A>(xr[j]);
            const A a = v < A(0) ? -v : v;
            m[0] = a > m[0] ? a : m[0];
            q[0] += v * v;
          }
          A amax = 0, ss = 0;
          for (int l = 0; l < kLanes; ++l) {
            amax = m[l] > amax ? m[l] : amax;
            ss += q[l];
          }
          // a NaN anywhere in the row makes the sum of squares NaN (Inf alone cannot): the flag
          const bool nan = std::isnan(ss);
          sp[2 * r] = nan ? std::numeric_limits<float>::quiet_NaN() : static_cast<float>(amax);
          sp[2 * r + 1] = static_cast<float>(ss);
        }
      });
    });
  });
  return stats;
}

// ‖g‖ finite <=> the sum of the per-row squares is finite (summed in float, fixed order)
bool grad_ok(const at::Tensor& stats) {
  auto s = stats.contiguous();
  const float* sp = s.data_ptr<float>();
  float total = 0.f;
  for (int64_t r = 0; r < s.size(0); ++r) total += sp[2 * r + 1];
  return std::isfinite(total);
}

// ---------------------------------------------------------------- SiFT
std::tuple<at::Tensor, at::Tensor> sift_perturb_cpu(const at::Tensor& xhat, const at::Tensor& noise, double bound) {
  check_cpu(xhat, "xhat");
  auto nz = noise.to(at::kFloat).contiguous();
  auto delta = at::empty(xhat.sizes(), xhat.options().dtype(at::kFloat));
  auto out = at::empty_like(xhat);
  const int64_t n = xhat.numel();
  if (n == 0) return {delta, out};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xhat.scalar_type(), "sift_perturb", [&] {
    using A = opmath_t<scalar_t>;
    const scalar_t* xp = xhat.data_ptr<scalar_t>();
    const float* np_ = nz.data_ptr<float>();
    float* dp = delta.data_ptr<float>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const float b = static_cast<float>(bound);
    at::parallel_for(0, n, 32768, [&](int64_t i0, int64_t i1) {
      cpu::vec::with_width([&](auto) {  // the loops below in AVX2 code on AVX2 CPUs (vec.h): same bits
        for (int64_t i = i0; i < i1; ++i) {
          const float d = clamp_keep_nan(np_[i], -b, b);
          dp[i] = d;
          op[i] = static_cast<scalar_t>(static_cast<A>(xp[i]) + static_cast<A>(d));
        }
      });
    });
  });
  return {delta, out};
}

at::Tensor sift_update_cpu(const at::Tensor& delta, const at::Tensor& grad, const at::Tensor& xhat,
                           const at::Tensor& stats, double lr) {
  check_cpu(delta, "delta");
  TORCH_CHECK(delta.scalar_type() == at::kFloat || delta.scalar_type() == at::kDouble,
              "fused_adv: sift_update_ needs a float32/float64 delta");
  const int64_t h = last_dim(delta), rows = rows_of(delta);
  auto g = grad.contiguous();
  auto xh = xhat.contiguous();
  auto st = stats.contiguous();
  auto out = at::empty_like(xh);
  if (rows == 0) return out;
  const bool ok = grad_ok(st);
  AT_DISPATCH_FLOATING_TYPES(delta.scalar_type(), "sift_update_", [&] {
    using D = scalar_t;
    D* dp = delta.data_ptr<D>();
    const D* gp = g.data_ptr<D>();
    const float* sp = st.data_ptr<float>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xh.scalar_type(), "sift_update_out", [&] {
      using X = scalar_t;
      using XA = opmath_t<X>;
      const X* xp = xh.data_ptr<X>();
      X* op = out.data_ptr<X>();
      const D lrd = static_cast<D>(lr);
      at::parallel_for(0, rows, grain_rows(h), [&](int64_t r0, int64_t r1) {
        cpu::vec::with_width([&](auto) {  // the loops below in AVX2 code on AVX2 CPUs (vec.h): same bits
          for (int64_t r = r0; r < r1; ++r) {
            const D den = static_cast<D>(1e-6f) + static_cast<D>(sp[2 * r]);
            D* dr = dp + r * h;
            const D* gr = gp + r * h;
            const X* xr = xp + r * h;
            X* orow = op + r * h;
            for (int64_t j = 0; j < h; ++j) {
              D v = dr[j];
              if (ok) v = v + lrd * gr[j] / den;
              dr[j] = v;
              orow[j] = static_cast<X>(static_cast<XA>(xr[j]) + static_cast<XA>(v));
            }
          }
        });
      });
    });
  });
  return out;
}

// ---------------------------------------------------------------- SMART
at::Tensor smart_update_cpu(const at::Tensor& noise, const at::Tensor& grad, const at::Tensor& stats,
                            double step_size, double epsilon) {
  check_cpu(noise, "noise");
  const int64_t h = last_dim(noise), rows = rows_of(noise);
  auto g = grad.contiguous();
  const bool ok = rows == 0 || grad_ok(stats);
  if (rows > 0 && ok) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, noise.scalar_type(), "smart_update_", [&] {
      using A = opmath_t<scalar_t>;
      scalar_t* np_ = noise.data_ptr<scalar_t>();
      const scalar_t* gp = g.data_ptr<scalar_t>();
      const A step = static_cast<A>(step_size), eps = static_cast<A>(epsilon);
      at::parallel_for(0, rows, grain_rows(h), [&](int64_t r0, int64_t r1) {
        cpu::vec::with_width([&](auto) {  // the loops below in AVX2 code on AVX2 CPUs (vec.h): same bits
          for (int64_t r = r0; r < r1; ++r) {
            scalar_t* nr = np_ + r * h;
            const scalar_t* gr = gp + r * h;
            A m[kLanes] = {};
            int64_t j0 = 0;
            for (; j0 + kLanes <= h; j0 += kLanes) {
              for (int l = 0; l < kLanes; ++l) {
                const A v = static_cast<A>(nr[j0 + l]) + static_cast<A>(gr[j0 + l]) * step;
                m[l] = std::max(m[l], std::abs(v));  // g is finite here (guarded), so v is too
              }
            }
            for (; j0 < h; ++j0) {
              const A v = static_cast<A>(nr[j0]) + static_cast<A>(gr[j0]) * step;
              const A a = v < A(0) ? -v : v;
              m[0] = a > m[0] ? a : m[0];
            }
            A vmax = 0;
            for (int l = 0; l < kLanes; ++l) vmax = m[l] > vmax ? m[l] : vmax;
            const A den = vmax + eps;
            for (int64_t j = 0; j < h; ++j)
              nr[j] = static_cast<scalar_t>((static_cast<A>(nr[j]) + static_cast<A>(gr[j]) * step) / den);
          }
        });
      });
    });
  }
  return at::scalar_tensor(ok ? 1.0 : 0.0, noise.options().dtype(at::kFloat));
}

// ---------------------------------------------------------------- FreeLB (per sample)
constexpr int64_t kChunkSize = 16384;

at::Tensor freelb_reduce_cpu(const at::Tensor& delta, const at::Tensor& grad, bool linf) {
  check_cpu(delta, "delta");
  const int64_t b = delta.dim() ? delta.size(0) : 1;
  const int64_t n = b ? delta.numel() / b : 0;
  auto stats = at::zeros({b, 3}, delta.options().dtype(at::kFloat));
  if (b == 0 || n == 0) return stats;
  auto g = grad.contiguous();
  const int64_t nchunk = (n + kChunkSize - 1) / kChunkSize;
  std::vector<double> part(static_cast<size_t>(b * nchunk * 3), 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, delta.scalar_type(), "freelb_reduce", [&] {
    const scalar_t* dp = delta.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    at::parallel_for(0, b * nchunk, 1, [&](int64_t t0, int64_t t1) {
      cpu::vec::with_width([&](auto) {  // the loops below in AVX2 code on AVX2 CPUs (vec.h): same bits
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t s = t / nchunk, c = t % nchunk;
          const int64_t lo = c * kChunkSize, hi = std::min(n, lo + kChunkSize);
          const scalar_t* ds = dp + s * n;
          const scalar_t* gs = gp + s * n;
          double* pp = part.data() + 3 * t;
          using A = opmath_t<scalar_t>;
          // kLanes accumulators in the acc type per chunk (vectorisable); chunks combine in double
          if (linf) {
            A m[kLanes] = {}, z[kLanes] = {};
            int64_t j = lo;
            for (; j + kLanes <= hi; j += kLanes) {
              for (int l = 0; l < kLanes; ++l) {
                const A v = static_cast<A>(gs[j + l]);
                m[l] = std::max(m[l], std::abs(v));
                z[l] += (v != v) ? A(1) : A(0);  // NaN count (std::max may drop NaN)
              }
            }
            for (; j < hi; ++j) {
              const A v = static_cast<A>(gs[j]);
              m[0] = std::max(m[0], std::abs(v));
              z[0] += (v != v) ? A(1) : A(0);
            }
            A mm = 0, zz = 0;
            for (int l = 0; l < kLanes; ++l) {
              mm = std::max(mm, m[l]);
              zz += z[l];
            }
            pp[0] = zz > 0 ? std::numeric_limits<double>::quiet_NaN() : static_cast<double>(mm);
          } else {
            A gg[kLanes] = {}, dg[kLanes] = {}, dd[kLanes] = {};
            int64_t j = lo;
            for (; j + kLanes <= hi; j += kLanes) {
              for (int l = 0; l < kLanes; ++l) {
                const A gv = static_cast<A>(gs[j + l]), dv = static_cast<A>(ds[j + l]);
                gg[l] += gv * gv;
                dg[l] += dv * gv;
                dd[l] += dv * dv;
              }
            }
            for (; j < hi; ++j) {
              const A gv = static_cast<A>(gs[j]), dv = static_cast<A>(ds[j]);
              gg[0] += gv * gv;
              dg[0] += dv * gv;
              dd[0] += dv * dv;
            }
            for (int l = 0; l < kLanes; ++l) {
              pp[0] += gg[l];
              pp[1] += dg[l];
              pp[2] += dd[l];
            }
          }
        }
      });
    });
  });
  float* sp = stats.data_ptr<float>();
  for (int64_t s = 0; s < b; ++s) {
    double acc[3] = {0, 0, 0};
    for (int64_t c = 0; c < nchunk; ++c) {
      const double* pp = part.data() + 3 * (s * nchunk + c);
      if (linf) {
        acc[0] = nan_max(pp[0], acc[0]);  // NaN-propagating (quiet_NaN() on the host)
      } else {
        for (int k = 0; k < 3; ++k) acc[k] += pp[k];
      }
    }
    for (int k = 0; k < 3; ++k) sp[3 * s + k] = static_cast<float>(acc[k]);
  }
  return stats;
}

void freelb_update_cpu(const at::Tensor& delta, const at::Tensor& grad, const at::Tensor& stats, double lr,
                       double max_norm, bool linf) {
  check_cpu(delta, "delta");
  const int64_t b = delta.dim() ? delta.size(0) : 1;
  const int64_t n = b ? delta.numel() / b : 0;
  if (b == 0 || n == 0) return;
  auto g = grad.contiguous();
  auto st = stats.contiguous();
  const float* sp = st.data_ptr<float>();
  const int64_t nchunk = (n + kChunkSize - 1) / kChunkSize;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, delta.scalar_type(), "freelb_update_", [&] {
    using A = opmath_t<scalar_t>;
    scalar_t* dp = delta.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const A lra = static_cast<A>(lr), mx = static_cast<A>(max_norm);
    const bool project = max_norm > 0;
    at::parallel_for(0, b * nchunk, 1, [&](int64_t t0, int64_t t1) {
      cpu::vec::with_width([&](auto) {  // the loops below in AVX2 code on AVX2 CPUs (vec.h): same bits
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t s = t / nchunk, c = t % nchunk;
          const int64_t lo = c * kChunkSize, hi = std::min(n, lo + kChunkSize);
          scalar_t* ds = dp + s * n;
          const scalar_t* gs = gp + s * n;
          const A s0 = static_cast<A>(sp[3 * s]);
          if (linf) {
            const A den = s0 < A(1e-8f) ? A(1e-8f) : s0;  // keeps NaN, as torch.clamp
            for (int64_t j = lo; j < hi; ++j) {
              A v = static_cast<A>(ds[j]) + lra * static_cast<A>(gs[j]) / den;
              if (project) v = clamp_keep_nan(v, -mx, mx);
              ds[j] = static_cast<scalar_t>(v);
            }
          } else {
            const A s1 = static_cast<A>(sp[3 * s + 1]), s2 = static_cast<A>(sp[3 * s + 2]);
            const A gn = std::sqrt(s0);
            const A den = gn < A(1e-8f) ? A(1e-8f) : gn;
            A r = 1;
            if (project) {
              const A cc = lra / den;
              A sq = s2 + 2 * cc * s1 + cc * cc * s0;  // ‖d + c g‖², analytically
              sq = sq < 0 ? A(0) : sq;
              const A dn = std::sqrt(sq);
              const A exceed = dn > mx ? A(1) : A(0);
              r = mx / dn * exceed + (1 - exceed);  // NaN when dn == 0, as the original
            }
            for (int64_t j = lo; j < hi; ++j) {
              A v = static_cast<A>(ds[j]) + lra * static_cast<A>(gs[j]) / den;
              if (project) v = v * r;
              ds[j] = static_cast<scalar_t>(v);
            }
          }
        }
      });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_adv, CPU, m) {
  m.impl("ln_delta_fwd", &ln_delta_fwd_cpu);
  m.impl("ln_delta_bwd", &ln_delta_bwd_cpu);
  m.impl("row_absmax_sumsq", &row_absmax_sumsq_cpu);
  m.impl("sift_perturb", &sift_perturb_cpu);
  m.impl("sift_update_", &sift_update_cpu);
  m.impl("smart_update_", &smart_update_cpu);
  m.impl("freelb_reduce", &freelb_reduce_cpu);
  m.impl("freelb_update_", &freelb_update_cpu);
}

}  // namespace fused_adv
