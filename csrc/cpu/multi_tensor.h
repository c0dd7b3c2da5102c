// Multi-tensor bookkeeping for the CPU kernels: cut every tensor of a call into fixed-size chunks,
// run the chunks of ALL tensors in one at::parallel_for, and keep one reduction partial per
// chunk so that results never depend on the thread count.
//
// Why chunks over all tensors, not a loop over tensors with a parallel_for each: a BERT parameter
// set is ~100 tensors, most of them small (biases, LayerNorm weights).  One parallel region for
// the whole list keeps both cores busy and pays the OpenMP fork once per phase instead of once
// per tensor.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "common/checks.h"
#include "common/kernel_math.h"

namespace fused_adv {
namespace cpu {

// Elements per chunk.  Fixed (never derived from the thread count) so that reduction partials,
// and therefore every result, are identical with 1 or N threads.  32768 fp32 elements = 128 KiB
// per stream: three streams (P, G, B) of one chunk stay in L2 between the backup copy and the
// update that re-reads P.
constexpr int64_t kChunkSize = int64_t{1} << 15;
// Calls touching fewer elements than this in total run on the calling thread: forking the
// OpenMP team costs a few microseconds, more than the work itself.
constexpr int64_t kSerialBelow = int64_t{1} << 16;

struct Chunk {
  int64_t tensor;  // index into the op's tensor lists
  int64_t begin;   // first element (int64: embeddings exceed 2^31 elements)
  int64_t end;     // one past the last element
};

// The chunks of a call in tensor-major order; first[i]..first[i+1] are the chunks of tensor i,
// so a per-tensor reduction sums its partials in one fixed order.
struct ChunkPlan {
  std::vector<Chunk> chunks;
  std::vector<int64_t> first;
  int64_t total = 0;  // elements over all tensors
};

inline ChunkPlan plan_chunks(at::TensorList tensors) {
  ChunkPlan plan;
  plan.first.reserve(tensors.size() + 1);
  for (size_t i = 0; i < tensors.size(); ++i) {
    plan.first.push_back(static_cast<int64_t>(plan.chunks.size()));
    const int64_t n = tensors[i].numel();
    plan.total += n;
    for (int64_t b = 0; b < n; b += kChunkSize) {
      plan.chunks.push_back({static_cast<int64_t>(i), b, std::min(n, b + kChunkSize)});
    }
  }
  plan.first.push_back(static_cast<int64_t>(plan.chunks.size()));
  return plan;
}

// Runs f(chunk_index, chunk) for every chunk of the plan, in parallel when the call is large
// enough.  f must only write memory owned by its chunk (or its own partial slot).
template <typename F>
void for_each_chunk(const ChunkPlan& plan, const F& f) {
  const int64_t n = static_cast<int64_t>(plan.chunks.size());
  if (n == 0) return;
  if (plan.total < kSerialBelow) {
    for (int64_t c = 0; c < n; ++c) f(c, plan.chunks[c]);
    return;
  }
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) f(c, plan.chunks[c]);
  });
}

// Calls f with a null scalar_t* whose type is the dtype of the tensor (float, double, half,
// bfloat16), so that one chunk loop serves lists with mixed dtypes.
template <typename F>
void dispatch_float(at::ScalarType st, const F& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "fused_adv_cpu",
                                  [&] { f(static_cast<scalar_t*>(nullptr)); });
}

}  // namespace cpu
}  // namespace fused_adv
