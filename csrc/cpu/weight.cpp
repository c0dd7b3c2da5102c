// CPU kernels of the weight-space ops (FGM, FGSM, PGD, AWP): TORCH_LIBRARY_IMPL(fused_adv, CPU).
//
// The math is the one stated by fused_adv/_torch/weight.py, element for element; the per-tensor
// factors, guards and element steps are csrc/common/kernel_math.h's (shared with csrc/cuda):
// * element math in float32 (float64 for double tensors), rounded once to P's dtype on store;
//   AWP's box is rounded to P's dtype after each op (e = adv_eps*|B|, lo = B-e, hi = B+e);
// * per-tensor factors are computed in float32 from the float32 norm tensors, in the same
//   operation order as the torch backend (x / n there is reciprocal(n) * x: Tensor.__rtruediv__);
// * guards (n != 0 and not NaN) are per tensor; a guarded-off tensor is left untouched;
// * reductions sum float32 products in 8 float32 lanes over 64 elements, then in double, with one
//   partial per fixed-size chunk summed in chunk order: results do not depend on the number of
//   threads (double tensors: double throughout);
// * backups and restores are memcpy: bit-exact in every dtype.
// Each phase is one parallel pass over the chunks of all tensors (see multi_tensor.h); within a
// chunk, float32/bf16/fp16 math runs 8 lanes wide on AVX2 CPUs, else scalar (vec.h), same bits.
#include <torch/library.h>

#include <type_traits>

#include "cpu/convert.h"
#include "cpu/multi_tensor.h"
#include "cpu/vec.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace fused_adv {
namespace cpu {
namespace {

using common::awp_box_e;
using common::awp_box_hi;
using common::awp_box_lo;
using common::awp_clamp;
using common::awp_factors;
using common::awp_step;
using common::fgm_factors;
using common::fgm_step;
using common::fgsm_step;
using common::opmath_t;
using common::pgd_factors;
using common::pgd_step;
using common::StepFactors;
using vec::combine8;
using vec::kWidenBlock;

// Argument checks of this file's ops: CPU tensors (csrc/common/checks.h).
void check_lists(const char* op, std::initializer_list<std::pair<const char*, at::TensorList>> lists) {
  common::check_lists(op, c10::DeviceType::CPU, lists);
}
const float* check_scalars(const char* op, const char* name, const at::Tensor& t, int64_t n, int64_t cols = 0) {
  return common::check_scalars(op, name, t, c10::Device(c10::DeviceType::CPU), n, cols);
}

// ---- reductions --------------------------------------------------------------------------
// Eight independent accumulators in a fixed pattern: a single running sum is a serial
// dependency chain the compiler may not reorder; eight lanes vectorize, and the final
// combination order is fixed, so the result is deterministic.
// For float/half/bfloat16 the products are first summed in float32 over 64 elements (8 lanes x 8
// steps), then flushed to the double accumulators: 8 float32 lanes are one AVX register (vec.h,
// W = 8) or a plain lane loop (W = 1), the same operations in the same order either way, and no
// conversion to double per element.  Eight fp32 additions per flush cost < 1e-6 relative, far
// below the float32 result's own rounding budget in the tests (docs/design.md §3 (Op contract)
// allows fp32 accumulation).  Tails shorter than 64 elements accumulate in double, lane i mod 8.
// bf16/fp16 chunks are widened block by block (convert.h) into float32 buffers first: float(x)
// is exact and every block but the last is a multiple of 64 elements, so the result is bit for
// bit that of summing the 16-bit elements directly (vec::sum8).

// Adds the squares of x[0..n) into the eight lanes (n a multiple of 64 unless it is a chunk's
// last block).
template <int W>
FUSED_ADV_INLINE void sumsq_into(const float* __restrict__ x, int64_t n, double acc[8]) {
  constexpr int R = 8 / W;  // vectors per 8 lanes
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    vec::vf<W> f[R];
    for (int r = 0; r < R; ++r) f[r] = vec::splat<W>(0.f);
    for (int s = 0; s < 64; s += 8) {
      for (int r = 0; r < R; ++r) {
        const vec::vf<W> v = vec::load<W>(x + i + s + r * W);
        f[r] += v * v;
      }
    }
    for (int r = 0; r < R; ++r) {
      for (int k = 0; k < W; ++k) acc[r * W + k] += vec::lane<W>(f[r], k);
    }
  }
  for (; i < n; ++i) {
    const double v = x[i];
    acc[i & 7] += v * v;
  }
}

// The double path: every product and sum in double, lane i mod 8.
inline void sumsq_into_f64(const double* __restrict__ x, int64_t n, double acc[8]) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int k = 0; k < 8; ++k) acc[k] += x[i + k] * x[i + k];
  }
  for (; i < n; ++i) acc[i & 7] += x[i] * x[i];
}

template <int W, typename T>
FUSED_ADV_INLINE double chunk_sumsq(const T* __restrict__ x, int64_t n) {
  return vec::sum8(x, n, [](const auto* v, int64_t m, double* acc) {
    if constexpr (std::is_same_v<decltype(v), const double*>) {
      sumsq_into_f64(v, m, acc);
    } else {
      sumsq_into<W>(v, m, acc);
    }
  });
}

// (||G||^2, <P-B, G>, ||P-B||^2) over one chunk.  float32 path: d = P - B and the products in
// float32, summed over 64 elements in 8 float32 lanes per statistic, flushed to double lanes (as
// sumsq_into); tails and the double path: d and the products in double.
template <int W>
FUSED_ADV_INLINE void pgd_stats_into(const float* __restrict__ p, const float* __restrict__ g,
                                     const float* __restrict__ b, int64_t n, double gg[8], double dg[8],
                                     double dd[8]) {
  constexpr int R = 8 / W;
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    vec::vf<W> fgg[R], fdg[R], fdd[R];
    for (int r = 0; r < R; ++r) fgg[r] = fdg[r] = fdd[r] = vec::splat<W>(0.f);
    for (int s = 0; s < 64; s += 8) {
      for (int r = 0; r < R; ++r) {
        const int64_t j = i + s + r * W;
        const vec::vf<W> gv = vec::load<W>(g + j);
        const vec::vf<W> d = vec::load<W>(p + j) - vec::load<W>(b + j);
        fgg[r] += gv * gv;
        fdg[r] += d * gv;
        fdd[r] += d * d;
      }
    }
    for (int r = 0; r < R; ++r) {
      for (int k = 0; k < W; ++k) {
        gg[r * W + k] += vec::lane<W>(fgg[r], k);
        dg[r * W + k] += vec::lane<W>(fdg[r], k);
        dd[r * W + k] += vec::lane<W>(fdd[r], k);
      }
    }
  }
  for (; i < n; ++i) {
    const double gv = g[i];
    const double d = static_cast<double>(p[i]) - static_cast<double>(b[i]);
    gg[i & 7] += gv * gv;
    dg[i & 7] += d * gv;
    dd[i & 7] += d * d;
  }
}

inline void pgd_stats_into_f64(const double* __restrict__ p, const double* __restrict__ g,
                               const double* __restrict__ b, int64_t n, double gg[8], double dg[8], double dd[8]) {
  for (int64_t i = 0; i < n; ++i) {
    const double d = p[i] - b[i];
    gg[i & 7] += g[i] * g[i];
    dg[i & 7] += d * g[i];
    dd[i & 7] += d * d;
  }
}

template <int W, typename T>
FUSED_ADV_INLINE void chunk_pgd_stats(const T* __restrict__ p, const T* __restrict__ g, const T* __restrict__ b,
                                      int64_t n, double out[3]) {
  double gg[8] = {0, 0, 0, 0, 0, 0, 0, 0}, dg[8] = {0, 0, 0, 0, 0, 0, 0, 0}, dd[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  if constexpr (std::is_same_v<T, double>) {
    pgd_stats_into_f64(p, g, b, n, gg, dg, dd);
  } else if constexpr (std::is_same_v<T, float>) {
    pgd_stats_into<W>(p, g, b, n, gg, dg, dd);
  } else {
    constexpr int64_t kB = kWidenBlock / 2;
    alignas(64) float pf[kB], gf[kB], bf[kB];
    for (int64_t j0 = 0; j0 < n; j0 += kB) {
      const int64_t m = std::min(kB, n - j0);
      to_float(p + j0, pf, m);
      to_float(g + j0, gf, m);
      to_float(b + j0, bf, m);
      pgd_stats_into<W>(static_cast<const float*>(pf), static_cast<const float*>(gf), static_cast<const float*>(bf),
                        m, gg, dg, dd);
    }
  }
  out[0] = combine8(gg);
  out[1] = combine8(dg);
  out[2] = combine8(dd);
}

// Sums each tensor's chunk partials (stride `width`, column `col`) in chunk order.
void finish(const ChunkPlan& plan, const std::vector<double>& partials, int64_t width, float* out) {
  const int64_t n = static_cast<int64_t>(plan.first.size()) - 1;
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t col = 0; col < width; ++col) {
      double s = 0;
      for (int64_t c = plan.first[t]; c < plan.first[t + 1]; ++c) s += partials[c * width + col];
      out[t * width + col] = static_cast<float>(s);
    }
  }
}

at::Tensor multi_tensor_sumsq_cpu(at::TensorList tensors) {
  check_lists("multi_tensor_sumsq", {{"tensors", tensors}});
  const auto plan = plan_chunks(tensors);
  std::vector<double> partials(plan.chunks.size());
  for_each_chunk(plan, [&](int64_t c, const Chunk& ch) {
    dispatch_float(tensors[ch.tensor].scalar_type(), [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      const T* x = tensors[ch.tensor].template const_data_ptr<T>() + ch.begin;
      vec::with_width([&](auto w) { partials[c] = chunk_sumsq<decltype(w)::value>(x, ch.end - ch.begin); });
    });
  });
  at::Tensor out = at::empty({static_cast<int64_t>(tensors.size())}, at::TensorOptions().dtype(at::kFloat));
  finish(plan, partials, 1, out.data_ptr<float>());
  return out;
}

at::Tensor pgd_reduce_cpu(at::TensorList params, at::TensorList grads, at::TensorList backups, bool first) {
  check_lists("pgd_reduce", {{"params", params}, {"grads", grads}, {"backups", backups}});
  const auto plan = plan_chunks(params);
  std::vector<double> partials(plan.chunks.size() * 3);
  for_each_chunk(plan, [&](int64_t c, const Chunk& ch) {
    dispatch_float(params[ch.tensor].scalar_type(), [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      const int64_t n = ch.end - ch.begin;
      const T* g = grads[ch.tensor].template const_data_ptr<T>() + ch.begin;
      double* out = &partials[c * 3];
      if (first) {  // d = 0: backups are not read (they may not hold anything yet)
        vec::with_width([&](auto w) { out[0] = chunk_sumsq<decltype(w)::value>(g, n); });
        out[1] = out[2] = 0;
      } else {
        const T* p = params[ch.tensor].template const_data_ptr<T>() + ch.begin;
        const T* b = backups[ch.tensor].template const_data_ptr<T>() + ch.begin;
        vec::with_width([&](auto w) { chunk_pgd_stats<decltype(w)::value>(p, g, b, n, out); });
      }
    });
  });
  at::Tensor out = at::empty({static_cast<int64_t>(params.size()), 3}, at::TensorOptions().dtype(at::kFloat));
  finish(plan, partials, 3, out.data_ptr<float>());
  return out;
}

// ---- updates -----------------------------------------------------------------------------
// Tensors at least this large are backed up with non-temporal (streaming) stores: a backup is
// not read again until restore, and an ordinary store first reads the destination line into
// cache (read-for-ownership), so a plain copy moves 3 bytes per byte copied instead of 2.
// (On the shared 2-core CI VM the gain was within its noise: the backup of a 31 MB fp32
// embedding cost ~15 ms either way.)  Smaller tensors keep ordinary stores (they may still be
// in cache when used).
constexpr int64_t kStreamBytes = int64_t{1} << 20;

// dst <- src, bit-exact (integer moves: NaN payloads and signed zeros are untouched).
inline void copy_bytes(char* __restrict__ dst, const char* __restrict__ src, int64_t bytes, bool stream) {
#if defined(__SSE2__)
  if (stream && (reinterpret_cast<uintptr_t>(dst) % 16) == 0 && (reinterpret_cast<uintptr_t>(src) % 16) == 0) {
    const int64_t vec = bytes / 64 * 64;
    for (int64_t k = 0; k < vec; k += 64) {
      const __m128i a = _mm_load_si128(reinterpret_cast<const __m128i*>(src + k));
      const __m128i b = _mm_load_si128(reinterpret_cast<const __m128i*>(src + k + 16));
      const __m128i c = _mm_load_si128(reinterpret_cast<const __m128i*>(src + k + 32));
      const __m128i d = _mm_load_si128(reinterpret_cast<const __m128i*>(src + k + 48));
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + k), a);
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + k + 16), b);
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + k + 32), c);
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + k + 48), d);
    }
    if (bytes > vec) std::memcpy(dst + vec, src + vec, static_cast<size_t>(bytes - vec));
    _mm_sfence();  // order the streaming stores before anything this thread does next
    return;
  }
#endif
  (void)stream;
  std::memcpy(dst, src, static_cast<size_t>(bytes));
}

// dst <- src over one chunk, bit-exact.
inline void copy_chunk(const at::Tensor& dst, const at::Tensor& src, const Chunk& ch) {
  const int64_t es = static_cast<int64_t>(src.element_size());
  copy_bytes(static_cast<char*>(dst.data_ptr()) + ch.begin * es,
             static_cast<const char*>(src.const_data_ptr()) + ch.begin * es, (ch.end - ch.begin) * es,
             src.numel() * es >= kStreamBytes);
}

// True if the 64 bytes at a and b differ in any bit (integer compare: NaN payloads, -0 count).
FUSED_ADV_INLINE bool line_differs(const void* a, const void* b) {
#if defined(__SSE2__)
  const char* x = static_cast<const char*>(a);
  const char* y = static_cast<const char*>(b);
  __m128i d = _mm_xor_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)),
                            _mm_loadu_si128(reinterpret_cast<const __m128i*>(y)));
  for (int k = 16; k < 64; k += 16) {
    d = _mm_or_si128(d, _mm_xor_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + k)),
                                      _mm_loadu_si128(reinterpret_cast<const __m128i*>(y + k))));
  }
  return _mm_movemask_epi8(_mm_cmpeq_epi8(d, _mm_setzero_si128())) != 0xFFFF;
#else
  return std::memcmp(a, b, 64) != 0;
#endif
}

// dst <- src over one chunk, bit-exact, writing only the 64-byte lines that differ: after an
// attack on an embedding most rows are unchanged (G = 0 there), and a line that is not written
// costs no write back.  When every line differs this moves what an ordinary copy moves (the
// destination line is read before it is written either way).
inline void restore_chunk(const at::Tensor& dst, const at::Tensor& src, const Chunk& ch) {
  const int64_t es = static_cast<int64_t>(src.element_size());
  char* d = static_cast<char*>(dst.data_ptr()) + ch.begin * es;
  const char* s = static_cast<const char*>(src.const_data_ptr()) + ch.begin * es;
  const int64_t bytes = (ch.end - ch.begin) * es;
  int64_t k = 0;
  for (; k + 64 <= bytes; k += 64) {
    if (line_differs(d + k, s + k)) std::memcpy(d + k, s + k, 64);
  }
  if (k < bytes) std::memcpy(d + k, s + k, static_cast<size_t>(bytes - k));
}

template <typename T>
T* ptr(const at::Tensor& t, const Chunk& ch) {
  return static_cast<T*>(t.data_ptr()) + ch.begin;
}

// The update passes store a 64-byte line only when some bit of it changes.  Why: on an embedding,
// the rows of tokens absent from the batch have G = 0 and come out of every step bit for bit
// unchanged; not storing them leaves their cache lines clean (no write back), and restore_ then
// finds them equal too.  Results are exactly those of storing every element.  The new values
// are computed a block at a time into a stack buffer, then compared and stored line by line.
// p[0..m) <- nv[0..m), storing only the 64-byte lines in which some bit changes.
template <typename T>
FUSED_ADV_INLINE void store_changed_lines(T* p, const T* nv, int m) {
  constexpr int L = 64 / static_cast<int>(sizeof(T));  // elements per 64-byte line
  int k = 0;
  for (; k + L <= m; k += L) {
    if (line_differs(nv + k, p + k)) std::memcpy(p + k, nv + k, 64);
  }
  if (k < m) std::memcpy(p + k, nv + k, static_cast<size_t>(m - k) * sizeof(T));
}

// The double path: op(p, g, b) -> new value per element (csrc/common's step, in double), computed
// 2 KiB at a time into a stack buffer, then compared and stored line by line.  Without USE_B, op
// gets p in b's place and b is not read.
template <bool USE_B, typename Op>
inline void update_lines_f64(double* p, const double* __restrict__ g, const double* b, int64_t n, const Op& op) {
  constexpr int BUF = 256;
  alignas(64) double nv[BUF];
  for (int64_t j0 = 0; j0 < n; j0 += BUF) {
    const int m = static_cast<int>(std::min<int64_t>(BUF, n - j0));
    {  // restrict-qualified views only while nothing is written through p
      const double* __restrict__ pj = p + j0;
      const double* __restrict__ gj = g + j0;
      const double* __restrict__ bj = (USE_B ? b : p) + j0;
      for (int k = 0; k < m; ++k) nv[k] = op(pj[k], gj[k], bj[k]);
    }
    store_changed_lines(p + j0, nv, m);
  }
}

// The float32 / bf16 / fp16 path, 1024 elements at a time: block_op(w, out, p, g, b, m)
// (w: std::integral_constant<int, W>) reads the block's P, G (and B) and writes its new values as
// T elements into a stack buffer (lanes widened and rounded in registers, vec.h), which is then
// stored where a line changes.  The stored bits are those of csrc/common's element steps on T.
template <int W, bool USE_B, typename T, typename BlockOp>
FUSED_ADV_INLINE void update_lines(T* p, const T* __restrict__ g, const T* b, int64_t n, const BlockOp& block_op) {
  constexpr int BUF = 1024;
  alignas(64) T nv[BUF];
  for (int64_t j0 = 0; j0 < n; j0 += BUF) {
    const int m = static_cast<int>(std::min<int64_t>(BUF, n - j0));
    block_op(std::integral_constant<int, W>{}, nv, static_cast<const T*>(p + j0), g + j0, USE_B ? b + j0 : nullptr, m);
    store_changed_lines(p + j0, static_cast<const T*>(nv), m);
  }
}

// Runs the element update of one chunk: double through update_lines_f64 with the element step
// of csrc/common, every other dtype through update_lines at the width vec.h picks.
template <bool USE_B, typename T, typename F64Op, typename BlockOp>
inline void update_chunk(T* p, const T* g, const T* b, int64_t n, const F64Op& f64_op, const BlockOp& block_op) {
  if constexpr (std::is_same_v<T, double>) {
    update_lines_f64<USE_B>(p, g, b, n, f64_op);
  } else {
    vec::with_width([&](auto w) { update_lines<decltype(w)::value, USE_B>(p, g, b, n, block_op); });
  }
}

// ---- the ops -----------------------------------------------------------------------------
// Each block op states one method's element step twice: as W-lane vector code (vec.h) and as
// csrc/common's element function on T for W = 1 and the tails; the two agree bit for bit.

void fgm_perturb_cpu(at::TensorList params, at::TensorList grads, at::TensorList backups,
                     const at::Tensor& grad_sumsq, double epsilon, bool write_backup) {
  check_lists("fgm_perturb_", {{"params", params}, {"grads", grads}, {"backups", backups}});
  const int64_t N = static_cast<int64_t>(params.size());
  const float* gsq = check_scalars("fgm_perturb_", "grad_sumsq", grad_sumsq, N);
  // per-tensor factor and guard (csrc/common/kernel_math.h), once per call
  std::vector<StepFactors> fac(N);
  for (int64_t i = 0; i < N; ++i) fac[i] = fgm_factors(gsq[i], static_cast<float>(epsilon));
  const auto plan = plan_chunks(params);
  for_each_chunk(plan, [&](int64_t, const Chunk& ch) {
    const int64_t i = ch.tensor;
    if (write_backup) copy_chunk(backups[i], params[i], ch);  // taken even when skipped
    if (!fac[i].ok) return;
    dispatch_float(params[i].scalar_type(), [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      // n = +inf passes the guard: c = 0, so finite entries add 0 and inf entries give NaN.
      const float c = fac[i].c;
      update_chunk<false>(
          ptr<T>(params[i], ch), ptr<T>(grads[i], ch), static_cast<const T*>(nullptr), ch.end - ch.begin,
          [c](double pv, double gv, double) { return fgm_step(pv, gv, static_cast<double>(c)); },
          [c](auto w, auto* out, const auto* pj, const auto* gj, const auto*, int m) {
            vec::map<decltype(w)::value>(
                m, out, [c](auto pv, auto gv) { return pv + gv * c; },
                [c](auto pv, auto gv) { return fgm_step(pv, gv, c); }, pj, gj);
          });
    });
  });
}

void fgsm_perturb_cpu(at::TensorList params, at::TensorList grads, at::TensorList backups, double epsilon,
                      bool write_backup) {
  check_lists("fgsm_perturb_", {{"params", params}, {"grads", grads}, {"backups", backups}});
  const auto plan = plan_chunks(params);
  for_each_chunk(plan, [&](int64_t, const Chunk& ch) {
    const int64_t i = ch.tensor;
    if (write_backup) copy_chunk(backups[i], params[i], ch);
    dispatch_float(params[i].scalar_type(), [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      const float eps = static_cast<float>(epsilon);
      update_chunk<false>(
          ptr<T>(params[i], ch), ptr<T>(grads[i], ch), static_cast<const T*>(nullptr), ch.end - ch.begin,
          [epsilon](double pv, double gv, double) { return fgsm_step(pv, gv, epsilon); },
          [eps](auto w, auto* out, const auto* pj, const auto* gj, const auto*, int m) {
            vec::map<decltype(w)::value>(
                m, out, [eps](auto pv, auto gv) { return pv + eps * vec::sign_of(gv); },
                [eps](auto pv, auto gv) { return fgsm_step(pv, gv, eps); }, pj, gj);
          });
    });
  });
}

void pgd_perturb_cpu(at::TensorList params, at::TensorList grads, at::TensorList backups, const at::Tensor& stats,
                     double alpha, double epsilon, bool first) {
  check_lists("pgd_perturb_", {{"params", params}, {"grads", grads}, {"backups", backups}});
  const int64_t N = static_cast<int64_t>(params.size());
  const float* st = check_scalars("pgd_perturb_", "stats", stats, N, 3);
  // per-tensor factors and guard (csrc/common/kernel_math.h); d = P - B = 0 on the first step
  std::vector<StepFactors> fac(N);
  for (int64_t i = 0; i < N; ++i) {
    fac[i] = pgd_factors(st[3 * i], first ? 0.f : st[3 * i + 1], first ? 0.f : st[3 * i + 2],
                         static_cast<float>(alpha), static_cast<float>(epsilon));
  }
  const auto plan = plan_chunks(params);
  for_each_chunk(plan, [&](int64_t, const Chunk& ch) {
    const int64_t i = ch.tensor;
    if (first) copy_chunk(backups[i], params[i], ch);
    if (!fac[i].ok) return;  // skipped: P bit for bit, no projection this step
    dispatch_float(params[i].scalar_type(), [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      const float c = fac[i].c, s = fac[i].s;
      update_chunk<true>(
          ptr<T>(params[i], ch), ptr<T>(grads[i], ch), ptr<T>(backups[i], ch), ch.end - ch.begin,
          [c, s](double pv, double gv, double bv) {
            return pgd_step(pv, gv, bv, static_cast<double>(c), static_cast<double>(s));
          },
          [c, s](auto w, auto* out, const auto* pj, const auto* gj, const auto* bj, int m) {
            vec::map<decltype(w)::value>(
                m, out, [c, s](auto pv, auto gv, auto bv) { return bv + s * ((pv - bv) + c * gv); },
                [c, s](auto pv, auto gv, auto bv) { return pgd_step(pv, gv, bv, c, s); }, pj, gj, bj);
          });
    });
  });
}

// AWP's block op.  The box is computed in T's precision, each stage rounded to T (the reference
// computes it in P's dtype): e = adv_eps*|B|, lo = B - e, hi = B + e, then the clamped step, in
// one pass, the roundings in registers (vec::round_to: the identity for float32).
template <typename T>
struct AwpBlock {
  float c, ae;
  template <typename Wc>
  FUSED_ADV_INLINE void operator()(Wc, T* out, const T* pj, const T* gj, const T* bj, int m) const {
    const float c_ = c, ae_ = ae;
    vec::map<Wc::value>(
        m, out,
        [c_, ae_](auto pv, auto gv, auto bv) {
          const auto e = vec::round_to<T>(ae_ * vec::abs_(bv));
          const auto lo = vec::round_to<T>(bv - e), hi = vec::round_to<T>(bv + e);
          return vec::nan_min(vec::nan_max(pv + gv * c_, lo), hi);
        },
        [c_, ae_](T pv, T gv, T bv) { return awp_step(pv, gv, bv, c_, ae_); }, pj, gj, bj);
  }
};

void awp_perturb_cpu(at::TensorList params, at::TensorList grads, at::TensorList backups,
                     const at::Tensor& grad_sumsq, const at::Tensor& param_sumsq, double adv_lr, double adv_eps,
                     bool first) {
  check_lists("awp_perturb_", {{"params", params}, {"grads", grads}, {"backups", backups}});
  const int64_t N = static_cast<int64_t>(params.size());
  const float* gsq = check_scalars("awp_perturb_", "grad_sumsq", grad_sumsq, N);
  const float* psq = check_scalars("awp_perturb_", "param_sumsq", param_sumsq, N);
  // per-tensor factor and guard (csrc/common/kernel_math.h)
  std::vector<StepFactors> fac(N);
  for (int64_t i = 0; i < N; ++i) fac[i] = awp_factors(gsq[i], psq[i], static_cast<float>(adv_lr));
  const auto plan = plan_chunks(params);
  for_each_chunk(plan, [&](int64_t, const Chunk& ch) {
    const int64_t i = ch.tensor;
    if (first) copy_chunk(backups[i], params[i], ch);  // every tensor, guarded or not
    if (!fac[i].ok) return;                            // skipped: no step, no clamp
    dispatch_float(params[i].scalar_type(), [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      const float c = fac[i].c;
      update_chunk<true>(
          ptr<T>(params[i], ch), ptr<T>(grads[i], ch), ptr<T>(backups[i], ch), ch.end - ch.begin,
          [c, adv_eps](double pv, double gv, double bv) { return awp_step(pv, gv, bv, static_cast<double>(c), adv_eps); },
          AwpBlock<T>{c, static_cast<float>(adv_eps)});
    });
  });
}

void restore_cpu(at::TensorList params, at::TensorList backups) {
  check_lists("restore_", {{"params", params}, {"backups", backups}});
  const auto plan = plan_chunks(params);
  for_each_chunk(plan, [&](int64_t, const Chunk& ch) { restore_chunk(params[ch.tensor], backups[ch.tensor], ch); });
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_adv, CPU, m) {
  m.impl("multi_tensor_sumsq", &multi_tensor_sumsq_cpu);
  m.impl("pgd_reduce", &pgd_reduce_cpu);
  m.impl("fgm_perturb_", &fgm_perturb_cpu);
  m.impl("fgsm_perturb_", &fgsm_perturb_cpu);
  m.impl("pgd_perturb_", &pgd_perturb_cpu);
  m.impl("awp_perturb_", &awp_perturb_cpu);
  m.impl("restore_", &restore_cpu);
}

}  // namespace cpu
}  // namespace fused_adv
