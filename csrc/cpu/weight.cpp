// CPU kernels of the weight-space ops (FGM, FGSM, PGD, AWP): TORCH_LIBRARY_IMPL(fused_adv, CPU).
//
// The math is the one stated by fused_adv/_torch/weight.py, element for element; the per-tensor
// factors, guards and element steps are csrc/common/kernel_math.h's (shared with csrc/cuda):
// * element math in float32 (float64 for double tensors), rounded once to P's dtype on store;
//   AWP's box is rounded to P's dtype after each op (e = adv_eps*|B|, lo = B-e, hi = B+e);
// * per-tensor factors are computed in float32 from the float32 norm tensors, in the same
//   operation order as the torch backend (x / n there is reciprocal(n) * x: Tensor.__rtruediv__);
// * guards (n != 0 and not NaN) are per tensor; a guarded-off tensor is left untouched;
// * reductions accumulate in double, with one partial per fixed-size chunk summed in chunk
//   order: results do not depend on the number of threads;
// * backups and restores are memcpy: bit-exact in every dtype.
// Each phase is one parallel pass over the chunks of all tensors (see multi_tensor.h).
#include <torch/library.h>

#include <type_traits>

// As csrc/cpu/weight_ext.cpp: this file's functions and the element math of kernel_math.h (whose
// guard is first met here) are compiled without -ftrapping-math, so FP comparisons may be
// evaluated speculatively and AWP's NaN-propagating clamp if-converts and vectorizes.  Results are
// unchanged (no reassociation, no contraction: -ffp-contract=off still holds); only the FP
// exception flags, which nothing reads, may differ.
#pragma GCC optimize("no-trapping-math")
#include "cpu/convert.h"
#include "cpu/multi_tensor.h"

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

template <typename T>
inline double up64(T x) {
  return static_cast<double>(static_cast<opmath_t<T>>(x));
}

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
// For float/half/bfloat16 the squares are first summed in float32 over 64 elements (8 lanes x 8
// steps), then flushed to the double accumulators: float32 multiply-adds are 4 per SSE op instead
// of 2 with no conversion to double (31 MB fp32, 1 thread on the CI VM: 5.7 -> 5.2 ms, torch.sum
// 3.5-4.0 ms; the rest is memory).  Eight fp32 additions per flush cost < 1e-6 relative, far below
// the float32 result's own rounding budget in the tests (and docs/design.md §3 (Op contract) allows
// fp32 accumulation).
// bf16/fp16 chunks are widened block by block (convert.h) into a float32 buffer and summed with
// the float32 instantiation: float(x) is exact, every block but the last is a multiple of 64
// elements, and the lane of a tail element is its index within the chunk mod 8 as before, so
// the result is bit for bit that of summing the 16-bit elements directly.
constexpr int64_t kWidenBlock = 2048;  // elements per float32 buffer (8 KiB): a multiple of 64

inline double combine8(const double acc[8]) {
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// Adds the squares of x[0..n) into the eight lanes (n a multiple of 64 unless it is a chunk's
// last block).
template <typename T>
void sumsq_into(const T* __restrict__ x, int64_t n, double acc[8]) {
  int64_t i = 0;
  if constexpr (!std::is_same_v<T, double>) {
    for (; i + 64 <= n; i += 64) {
      float f[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int s = 0; s < 64; s += 8) {
        for (int k = 0; k < 8; ++k) {
          const float v = static_cast<float>(x[i + s + k]);
          f[k] += v * v;
        }
      }
      for (int k = 0; k < 8; ++k) acc[k] += f[k];
    }
  }
  for (; i + 8 <= n; i += 8) {
    for (int k = 0; k < 8; ++k) {
      const double v = up64(x[i + k]);
      acc[k] += v * v;
    }
  }
  for (; i < n; ++i) {
    const double v = up64(x[i]);
    acc[i & 7] += v * v;
  }
}

template <typename T>
double chunk_sumsq(const T* __restrict__ x, int64_t n) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  if constexpr (is_low_precision_v<T>) {
    alignas(64) float buf[kWidenBlock];
    for (int64_t j0 = 0; j0 < n; j0 += kWidenBlock) {
      const int64_t m = std::min(kWidenBlock, n - j0);
      to_float(x + j0, buf, m);
      sumsq_into(static_cast<const float*>(buf), m, acc);
    }
  } else {
    sumsq_into(x, n, acc);
  }
  return combine8(acc);
}

// (||G||^2, <P-B, G>, ||P-B||^2) over one chunk; d = P - B is formed in double (exact for
// every input dtype but double itself, where it is rounded once).
// (Lanes of four: bf16/fp16 blocks are widened as in chunk_sumsq, block sizes multiples of 4.)
template <typename T>
void pgd_stats_into(const T* __restrict__ p, const T* __restrict__ g, const T* __restrict__ b, int64_t n,
                    double gg[4], double dg[4], double dd[4]) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    for (int k = 0; k < 4; ++k) {
      const double gv = up64(g[i + k]);
      const double d = up64(p[i + k]) - up64(b[i + k]);
      gg[k] += gv * gv;
      dg[k] += d * gv;
      dd[k] += d * d;
    }
  }
  for (; i < n; ++i) {
    const double gv = up64(g[i]);
    const double d = up64(p[i]) - up64(b[i]);
    gg[i & 3] += gv * gv;
    dg[i & 3] += d * gv;
    dd[i & 3] += d * d;
  }
}

template <typename T>
void chunk_pgd_stats(const T* __restrict__ p, const T* __restrict__ g, const T* __restrict__ b,
                     int64_t n, double out[3]) {
  double gg[4] = {0, 0, 0, 0}, dg[4] = {0, 0, 0, 0}, dd[4] = {0, 0, 0, 0};
  if constexpr (is_low_precision_v<T>) {
    constexpr int64_t kB = kWidenBlock / 2;
    alignas(64) float pf[kB], gf[kB], bf[kB];
    for (int64_t j0 = 0; j0 < n; j0 += kB) {
      const int64_t m = std::min(kB, n - j0);
      to_float(p + j0, pf, m);
      to_float(g + j0, gf, m);
      to_float(b + j0, bf, m);
      pgd_stats_into(static_cast<const float*>(pf), static_cast<const float*>(gf), static_cast<const float*>(bf), m,
                     gg, dg, dd);
    }
  } else {
    pgd_stats_into(p, g, b, n, gg, dg, dd);
  }
  out[0] = (gg[0] + gg[1]) + (gg[2] + gg[3]);
  out[1] = (dg[0] + dg[1]) + (dg[2] + dg[3]);
  out[2] = (dd[0] + dd[1]) + (dd[2] + dd[3]);
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
      partials[c] = chunk_sumsq(x, ch.end - ch.begin);
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
        out[0] = chunk_sumsq(g, n);
        out[1] = out[2] = 0;
      } else {
        chunk_pgd_stats(params[ch.tensor].template const_data_ptr<T>() + ch.begin, g,
                        backups[ch.tensor].template const_data_ptr<T>() + ch.begin, n, out);
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
inline bool line_differs(const void* a, const void* b) {
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

// p[j] <- op(p[j], g[j], b[j]) over one chunk, storing a 64-byte line only when some bit of it
// changes.  Why: on an embedding, the rows of tokens absent from the batch have G = 0 and come out
// of every step bit for bit unchanged; not storing them leaves their cache lines clean (no write
// back), and restore_ then finds them equal too.  Results are exactly those of storing every
// element.  Without USE_B, op gets p in b's place and b is not read.
// The new values are computed 2 KiB at a time into a stack buffer (a plain loop the compiler
// vectorizes), then compared and stored line by line.
// p[0..m) <- nv[0..m), storing only the 64-byte lines in which some bit changes.
template <typename T>
inline void store_changed_lines(T* p, const T* nv, int m) {
  constexpr int L = 64 / static_cast<int>(sizeof(T));  // elements per 64-byte line
  int k = 0;
  for (; k + L <= m; k += L) {
    if (line_differs(nv + k, p + k)) std::memcpy(p + k, nv + k, 64);
  }
  if (k < m) std::memcpy(p + k, nv + k, static_cast<size_t>(m - k) * sizeof(T));
}

template <bool USE_B, typename T, typename Op>
inline void update_lines(T* p, const T* __restrict__ g, const T* b, int64_t n, const Op& op) {
  constexpr int BUF = 2048 / static_cast<int>(sizeof(T));
  alignas(64) T nv[BUF];
  for (int64_t j0 = 0; j0 < n; j0 += BUF) {
    const int m = static_cast<int>(std::min<int64_t>(BUF, n - j0));
    {  // restrict-qualified views only while nothing is written through p
      const T* __restrict__ pj = p + j0;
      const T* __restrict__ gj = g + j0;
      const T* __restrict__ bj = (USE_B ? b : p) + j0;
      for (int k = 0; k < m; ++k) nv[k] = op(pj[k], gj[k], bj[k]);
    }
    store_changed_lines(p + j0, nv, m);
  }
}

// update_lines for bf16/fp16: the block's P, G (and B) are widened into float32 buffers
// (convert.h, vectorised), block_op(pf, gf, bf, m) overwrites pf with the new values in float32
// (a plain float loop the compiler vectorises), and from_float rounds them once to T, as the
// element step's final static_cast<T> would: the stored bits are those of update_lines with the
// T-typed step.  Converting element by element instead made a bf16 pass slower than the fp32
// pass over twice the bytes.
template <bool USE_B, typename T, typename BlockOp>
inline void update_lines_lowp(T* p, const T* __restrict__ g, const T* b, int64_t n, const BlockOp& block_op) {
  constexpr int BUF = 1024;
  alignas(64) float pf[BUF], gf[BUF], bf[BUF];
  alignas(64) T nv[BUF];
  for (int64_t j0 = 0; j0 < n; j0 += BUF) {
    const int m = static_cast<int>(std::min<int64_t>(BUF, n - j0));
    to_float(p + j0, pf, m);
    to_float(g + j0, gf, m);
    if (USE_B) to_float(b + j0, bf, m);
    block_op(pf, static_cast<const float*>(gf), bf, m);
    from_float(pf, nv, m);
    store_changed_lines(p + j0, nv, m);
  }
}

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
      T* p = ptr<T>(params[i], ch);
      const T* __restrict__ g = ptr<T>(grads[i], ch);
      const opmath_t<T> c = static_cast<opmath_t<T>>(fac[i].c);
      // n = +inf passes the guard: c = 0, so finite entries add 0 and inf entries give NaN.
      if constexpr (is_low_precision_v<T>) {
        update_lines_lowp<false>(p, g, p, ch.end - ch.begin,
                                 [c](float* __restrict__ pf, const float* __restrict__ gf, float*, int m) {
                                   for (int k = 0; k < m; ++k) pf[k] = fgm_step<float>(pf[k], gf[k], c);
                                 });
      } else {
        update_lines<false>(p, g, p, ch.end - ch.begin, [c](T pv, T gv, T) { return fgm_step(pv, gv, c); });
      }
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
      T* p = ptr<T>(params[i], ch);
      const T* __restrict__ g = ptr<T>(grads[i], ch);
      const opmath_t<T> eps = static_cast<opmath_t<T>>(epsilon);
      if constexpr (is_low_precision_v<T>) {
        update_lines_lowp<false>(p, g, p, ch.end - ch.begin,
                                 [eps](float* __restrict__ pf, const float* __restrict__ gf, float*, int m) {
                                   for (int k = 0; k < m; ++k) pf[k] = fgsm_step<float>(pf[k], gf[k], eps);
                                 });
      } else {
        update_lines<false>(p, g, p, ch.end - ch.begin, [eps](T pv, T gv, T) { return fgsm_step(pv, gv, eps); });
      }
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
      using M = opmath_t<T>;
      T* p = ptr<T>(params[i], ch);
      const T* __restrict__ g = ptr<T>(grads[i], ch);
      const T* __restrict__ b = ptr<T>(backups[i], ch);
      const M c = static_cast<M>(fac[i].c), s = static_cast<M>(fac[i].s);
      if constexpr (is_low_precision_v<T>) {
        update_lines_lowp<true>(
            p, g, b, ch.end - ch.begin,
            [c, s](float* __restrict__ pf, const float* __restrict__ gf, float* __restrict__ bf, int m) {
              for (int k = 0; k < m; ++k) pf[k] = pgd_step<float>(pf[k], gf[k], bf[k], c, s);
            });
      } else {
        update_lines<true>(p, g, b, ch.end - ch.begin, [c, s](T pv, T gv, T bv) { return pgd_step(pv, gv, bv, c, s); });
      }
    });
  });
}

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
      using M = opmath_t<T>;
      T* p = ptr<T>(params[i], ch);
      const T* __restrict__ g = ptr<T>(grads[i], ch);
      const T* __restrict__ b = ptr<T>(backups[i], ch);
      const M c = static_cast<M>(fac[i].c), ae = static_cast<M>(adv_eps);
      if constexpr (is_low_precision_v<T>) {
        // awp_step's stages on float32 buffers, each rounding to T a block conversion: e and the
        // box (lo in bf's place, hi in its own buffer) in T's precision, then the clamped step.
        update_lines_lowp<true>(
            p, g, b, ch.end - ch.begin,
            [c, ae](float* __restrict__ pf, const float* __restrict__ gf, float* __restrict__ bf, int m) {
              alignas(64) float e[1024];
              for (int k = 0; k < m; ++k) e[k] = awp_box_e(bf[k], ae);
              round_through(static_cast<T*>(nullptr), e, m);
              for (int k = 0; k < m; ++k) {
                const float bv = bf[k];
                bf[k] = awp_box_lo(bv, e[k]);
                e[k] = awp_box_hi(bv, e[k]);
              }
              round_through(static_cast<T*>(nullptr), bf, m);
              round_through(static_cast<T*>(nullptr), e, m);
              for (int k = 0; k < m; ++k) pf[k] = awp_clamp(pf[k], gf[k], c, bf[k], e[k]);
            });
      } else {
        update_lines<true>(p, g, b, ch.end - ch.begin, [c, ae](T pv, T gv, T bv) { return awp_step(pv, gv, bv, c, ae); });
      }
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
