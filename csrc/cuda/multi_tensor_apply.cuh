// Apex-style multi-tensor launcher for the fused_adv CUDA kernels.
//
// Every tensor of a call is cut into kChunkSize-element chunks; each CUDA block processes one chunk.
// The table that maps a block to its (tensor, chunk) travels as a kernel argument (no device
// allocation, no host-to-device copy, no sync), so one launch serves up to kMaxBlocks chunks of up
// to kMaxTensors[DEPTH] tensors and a call over 100 small tensors costs one launch per phase.
// The per-element math lives in functors (weight.cu), apart from this launch bookkeeping.
//
// Reductions are two-phase and deterministic: block b of a launch writes one partial to slot
// slot_base + b (no atomics), the slots of a tensor are contiguous, and finish_kernel sums each
// tensor's slots in a fixed order.  Offsets are int64 (embeddings exceed 2^31 elements).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <vector>

#include "common/checks.h"
#include "common/kernel_math.h"

namespace fused_adv {
namespace cuda {

constexpr int kBlockThreads = 512;                      // threads per block
constexpr int64_t kChunkSize = int64_t{1} << 16;     // elements per block (multiple of every VEC)
constexpr int kMaxBlocks = 320;                 // blocks per launch (apex's table size)
// Tensors per launch by list depth: apex's numbers, which keep the kernel argument below the
// 4 KB limit that every CUDA version and architecture accepts.
constexpr int kMaxTensors[5] = {110, 64, 48, 36, 30};

template <int DEPTH>
struct TensorListMeta {
  void* addresses[DEPTH][kMaxTensors[DEPTH - 1]];  // list k, tensor t: base pointer
  int64_t sizes[kMaxTensors[DEPTH - 1]];           // numel of tensor t
  int32_t index[kMaxTensors[DEPTH - 1]];           // position of tensor t in the op's lists
  unsigned char block_to_tensor[kMaxBlocks];       // block b works on tensor block_to_tensor[b]
  int32_t block_to_chunk[kMaxBlocks];              // ... and on its chunk block_to_chunk[b]
  int64_t slot_base;                               // reduction slot of block 0 of this launch
};

// A functor is called once per block: f(meta, t, begin, n, slot) with t the table entry,
// [begin, begin + n) the chunk's elements and slot the block's reduction slot.
template <int DEPTH, typename Functor>
__global__ void __launch_bounds__(kBlockThreads) multi_tensor_kernel(TensorListMeta<DEPTH> meta, Functor f) {
  const int t = meta.block_to_tensor[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * kChunkSize;
  const int64_t left = meta.sizes[t] - begin;
  const int64_t n = left < kChunkSize ? left : kChunkSize;
  f(meta, t, begin, n, meta.slot_base + blockIdx.x);
}

// Number of reduction slots (= blocks) tensor of `numel` elements uses.
inline int64_t chunks_of(int64_t numel) { return (numel + kChunkSize - 1) / kChunkSize; }

// Launches f over the tensors `which` (indices into the lists; all of one dtype) of the DEPTH
// lists, as few launches as the table allows.  Blocks get consecutive reduction slots starting
// at slot_base, tensor-major in the order of `which`; returns the next free slot.
template <int DEPTH, typename Functor>
int64_t multi_tensor_apply(const std::vector<at::TensorList>& lists, const std::vector<int64_t>& which,
                           const Functor& f, int64_t slot_base = 0) {
  static_assert(sizeof(TensorListMeta<DEPTH>) + sizeof(Functor) <= 4000,
                "kernel arguments must stay below CUDA's 4 KB parameter limit");
  TORCH_CHECK(static_cast<int>(lists.size()) == DEPTH, "multi_tensor_apply: expected ", DEPTH, " lists");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  TensorListMeta<DEPTH> meta;
  meta.slot_base = slot_base;
  int loc_tensor = 0, loc_block = 0;
  auto launch = [&]() {
    multi_tensor_kernel<DEPTH, Functor><<<loc_block, kBlockThreads, 0, stream>>>(meta, f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    slot_base += loc_block;
    meta.slot_base = slot_base;
    loc_block = 0;
  };
  for (const int64_t i : which) {
    const int64_t numel = lists[0][i].numel();
    if (numel == 0) continue;  // no slots: its reduction is 0, its update a no-op
    for (int d = 0; d < DEPTH; ++d) meta.addresses[d][loc_tensor] = const_cast<void*>(lists[d][i].const_data_ptr());
    meta.sizes[loc_tensor] = numel;
    meta.index[loc_tensor] = static_cast<int32_t>(i);
    ++loc_tensor;
    const int64_t chunks = chunks_of(numel);
    for (int64_t c = 0; c < chunks; ++c) {
      meta.block_to_tensor[loc_block] = static_cast<unsigned char>(loc_tensor - 1);
      meta.block_to_chunk[loc_block] = static_cast<int32_t>(c);
      ++loc_block;
      const bool tensors_full = loc_tensor == kMaxTensors[DEPTH - 1] && c == chunks - 1;
      const bool blocks_full = loc_block == kMaxBlocks;
      if (tensors_full || blocks_full) {
        launch();
        if (c == chunks - 1) {
          loc_tensor = 0;
        } else {  // the current tensor continues in the next launch as entry 0
          for (int d = 0; d < DEPTH; ++d) meta.addresses[d][0] = meta.addresses[d][loc_tensor - 1];
          meta.sizes[0] = meta.sizes[loc_tensor - 1];
          meta.index[0] = meta.index[loc_tensor - 1];
          loc_tensor = 1;
        }
      }
    }
  }
  if (loc_block > 0) launch();
  return slot_base;
}

// ---- deterministic reductions ------------------------------------------------------------
// Sums v[k] over the block with a fixed shuffle tree; the result is valid in thread 0.
template <int NV>
__device__ inline void block_sum(float (&v)[NV]) {
  __shared__ float shared[NV][kBlockThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int k = 0; k < NV; ++k) {
#pragma unroll
    for (int off = 16; off > 0; off /= 2) v[k] += __shfl_down_sync(0xffffffffu, v[k], off);
  }
  __syncthreads();  // shared may still be read by a previous call
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < NV; ++k) shared[k][warp] = v[k];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      v[k] = lane < static_cast<int>(blockDim.x / 32) ? shared[k][lane] : 0.f;
#pragma unroll
      for (int off = 16; off > 0; off /= 2) v[k] += __shfl_down_sync(0xffffffffu, v[k], off);
    }
  }
}

// Per-tensor slot ranges for finish_kernel (kernel argument, 200 tensors per launch).
constexpr int kFinishTensors = 200;
struct FinishMeta {
  int64_t base[kFinishTensors];   // first slot of the tensor
  int32_t count[kFinishTensors];  // number of slots (0 for an empty tensor: result 0)
  int32_t index[kFinishTensors];  // row of the output
};

// out[index * WIDTH + k] = sum of partials[(base + j) * WIDTH + k] over the tensor's slots j,
// one block per tensor, fixed order.
template <int WIDTH>
__global__ void __launch_bounds__(kBlockThreads) finish_kernel(const float* __restrict__ partials, float* __restrict__ out,
                                                      FinishMeta meta) {
  const int t = blockIdx.x;
  float v[WIDTH];
#pragma unroll
  for (int k = 0; k < WIDTH; ++k) v[k] = 0.f;
  for (int64_t j = threadIdx.x; j < meta.count[t]; j += blockDim.x) {
#pragma unroll
    for (int k = 0; k < WIDTH; ++k) v[k] += partials[(meta.base[t] + j) * WIDTH + k];
  }
  block_sum<WIDTH>(v);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < WIDTH; ++k) out[static_cast<int64_t>(meta.index[t]) * WIDTH + k] = v[k];
  }
}

// Runs finish_kernel over every tensor (base/count indexed by position in the op's lists).
template <int WIDTH>
void finish(const at::Tensor& partials, const at::Tensor& out, const std::vector<int64_t>& base,
            const std::vector<int64_t>& count) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = static_cast<int64_t>(base.size());
  for (int64_t start = 0; start < n; start += kFinishTensors) {
    FinishMeta meta;
    const int64_t m = std::min<int64_t>(kFinishTensors, n - start);
    for (int64_t k = 0; k < m; ++k) {
      meta.base[k] = base[start + k];
      meta.count[k] = static_cast<int32_t>(count[start + k]);
      meta.index[k] = static_cast<int32_t>(start + k);
    }
    finish_kernel<WIDTH><<<static_cast<unsigned>(m), kBlockThreads, 0, stream>>>(
        partials.const_data_ptr<float>(), out.data_ptr<float>(), meta);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// ---- vectorized element access -----------------------------------------------------------
// VEC elements = 16 bytes: one 128-bit load/store per stream when every pointer is aligned.
template <typename T>
struct VecOf {
  static constexpr int N = 16 / sizeof(T);
  struct alignas(16) type {
    T v[N];
  };
};

template <typename T>
__device__ inline bool aligned16(const T* p) {
  return (reinterpret_cast<uintptr_t>(p) % 16) == 0;
}

}  // namespace cuda
}  // namespace fused_adv
