// Device side of the multi-tensor apply: the element loop of one chunk and the
// deterministic block reduction of its statistics. Included by the kernels' .cu files.
//
// Element loop. A chunk of `len` elements is read and written through up to kStreams
// storage pointers (the parameter, the gradient and the state tensors; nullptr for a
// stream the call does not use). When every pointer is 16-byte aligned, thread t handles
// packs t, t + blockDim, ... of 16 bytes (4 fp32 or 8 bf16/fp16 elements) with one vector
// load and store per stream, and the last len % width elements one at a time; otherwise
// every element goes one at a time. The math of an element is the op's, from alr_math.h.
//
// Statistics. A thread sums its elements' contributions in float (at most 32 terms per
// chunk); the block then adds the threads' sums as doubles in a fixed tree (warp shuffles,
// then the warps' results in warp order), so a chunk's partial depends only on its data
// and on whether it took the vector path, never on scheduling.
#pragma once

#include <cstdint>
#include <type_traits>

#include "alr_math.h"
#include "cuda/launch.h"
#include "cuda/multi_tensor.h"

namespace alr {
namespace cuda {

constexpr int kWarps = kBlockThreads / 32;
// Two resident blocks per SM (at most 64 registers per thread): a block alone would keep a
// quarter of an SM's warps in flight, too few to saturate HBM with these loads.
constexpr int kMinBlocksPerSm = 2;
static_assert(kBlockThreads % 32 == 0 && kWarps <= 32, "the block reduction needs whole warps, at most 32");

template <typename S>
struct alignas(16) Pack {
  static constexpr int kWidth = 16 / sizeof(S);
  S v[kWidth];
};

// The chunk of this block: its tensor slot, its first element and its element count.
template <typename Table>
struct ChunkOf {
  int slot;
  int64_t begin;  // 64-bit: tensors may exceed 2^31 elements
  int len;        // at most kChunkSize
  int64_t row;    // statistics row

  __device__ explicit ChunkOf(const Table& t) {
    slot = t.block_slot[blockIdx.x];
    const int64_t chunk = t.block_chunk[blockIdx.x];
    begin = chunk * kChunkSize;
    const int64_t rest = t.numel[slot] - begin;
    len = static_cast<int>(rest < kChunkSize ? rest : kChunkSize);
    row = t.first_row[slot] + chunk;
  }
};

// Runs op(x, acc) on every element of the chunk. x holds the kStreams values of the
// element in opmath (0 for absent streams) and receives the values to store; acc
// accumulates the thread's statistics (kSlots >= 1 slots, which the op may ignore). Streams
// in [0, kStreams) other than `read_only` are stored back when `write`.
template <typename S, int kStreams, int kSlots, typename Op>
__device__ __forceinline__ void apply_chunk(S* const (&ptr)[kStreams], int read_only, int len, bool write,
                                            const Op& op, float (&acc)[kSlots]) {
  constexpr int kWidth = Pack<S>::kWidth;
  bool aligned = true;
  for (int s = 0; s < kStreams; ++s) {
    aligned = aligned && reinterpret_cast<uintptr_t>(ptr[s]) % sizeof(Pack<S>) == 0;
  }
  const int vector_end = aligned ? len / kWidth * kWidth : 0;
  for (int base = threadIdx.x * kWidth; base < vector_end; base += blockDim.x * kWidth) {
    Pack<S> packs[kStreams];
    for (int s = 0; s < kStreams; ++s) {
      if (ptr[s] != nullptr) {
        packs[s] = *reinterpret_cast<const Pack<S>*>(ptr[s] + base);
      }
    }
#pragma unroll
    for (int e = 0; e < kWidth; ++e) {
      float x[kStreams];
      for (int s = 0; s < kStreams; ++s) {
        x[s] = ptr[s] != nullptr ? math::load(&packs[s].v[e]) : 0.0f;
      }
      op(x, acc);
      if (write) {
        for (int s = 0; s < kStreams; ++s) {
          math::store(&packs[s].v[e], x[s]);
        }
      }
    }
    if (write) {
      for (int s = 0; s < kStreams; ++s) {
        if (s != read_only && ptr[s] != nullptr) {
          *reinterpret_cast<Pack<S>*>(ptr[s] + base) = packs[s];
        }
      }
    }
  }
  for (int i = vector_end + threadIdx.x; i < len; i += blockDim.x) {
    float x[kStreams];
    for (int s = 0; s < kStreams; ++s) {
      x[s] = ptr[s] != nullptr ? math::load(ptr[s] + i) : 0.0f;
    }
    op(x, acc);
    if (write) {
      for (int s = 0; s < kStreams; ++s) {
        if (s != read_only && ptr[s] != nullptr) {
          math::store(ptr[s] + i, x[s]);
        }
      }
    }
  }
}

// Sums v over the block's threads in a fixed order; thread 0 receives the total. Every
// thread of the block must call it (it synchronises the block).
template <int kStats>
__device__ __forceinline__ void block_sum(double (&v)[kStats]) {
  __shared__ double warp_sums[kStats][kWarps];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  for (int k = 0; k < kStats; ++k) {
    for (int offset = 16; offset > 0; offset /= 2) {
      v[k] += __shfl_down_sync(0xffffffffu, v[k], offset);
    }
    if (lane == 0) {
      warp_sums[k][warp] = v[k];
    }
  }
  __syncthreads();
  if (warp == 0) {
    for (int k = 0; k < kStats; ++k) {
      v[k] = lane < kWarps ? warp_sums[k][lane] : 0.0;
      for (int offset = 16; offset > 0; offset /= 2) {
        v[k] += __shfl_down_sync(0xffffffffu, v[k], offset);
      }
    }
  }
}

// Reduces the threads' float sums and writes them to `row` of the [rows, kStats] partials.
template <int kStats>
__device__ __forceinline__ void store_partials(const float (&acc)[kStats], double* partials, int64_t row) {
  double v[kStats];
  for (int k = 0; k < kStats; ++k) {
    v[k] = static_cast<double>(acc[k]);
  }
  block_sum(v);
  if (threadIdx.x == 0) {
    for (int k = 0; k < kStats; ++k) {
      partials[row * kStats + k] = v[k];
    }
  }
}

// The effective gradient of alr_math.h with the call's device scalars: divided by the
// GradScaler's scale when there is one, times ±clip coefficient.
struct GradTransform {
  float scale;
  float mult;
  float weight_decay;
  bool has_scale;
  bool coupled_decay;

  __device__ __forceinline__ float operator()(float grad, float param) const {
    return has_scale ? math::effective_grad<true>(grad, param, scale, mult, weight_decay, coupled_decay)
                     : math::effective_grad<false>(grad, param, scale, mult, weight_decay, coupled_decay);
  }
};

// grad_sign · clip: -(g·c) == g·(-c) and g·1 == g exactly, as on the CPU.
template <typename Hyper>
__device__ __forceinline__ GradTransform grad_transform(const Hyper& h, const float* grad_scale,
                                                        const float* clip_coef) {
  GradTransform t;
  t.has_scale = grad_scale != nullptr;
  t.scale = t.has_scale ? *grad_scale : 1.0f;
  t.mult = (clip_coef != nullptr ? *clip_coef : 1.0f) * h.grad_sign;
  t.weight_decay = h.weight_decay;
  t.coupled_decay = h.coupled_decay;
  return t;
}

__device__ __forceinline__ double load_step(const void* step, bool is_double) {
  return is_double ? *static_cast<const double*>(step) : static_cast<double>(*static_cast<const float*>(step));
}

__device__ __forceinline__ bool skipped(const bool* skip) { return skip != nullptr && *skip; }

// --- Host side: template dispatch ----------------------------------------------------------

template <typename S>
struct StorageTag {
  using type = S;
};

template <Mode kMode>
using ModeTag = std::integral_constant<Mode, kMode>;

// Calls f(StorageTag<S>{}) for the storage type of `dtype` (alr_math.h's raw 16-bit types).
template <typename F>
void dispatch_dtype(Dtype dtype, F&& f) {
  switch (dtype) {
    case Dtype::kFloat:
      return f(StorageTag<float>{});
    case Dtype::kBFloat16:
      return f(StorageTag<math::bf16_t>{});
    case Dtype::kHalf:
      return f(StorageTag<math::fp16_t>{});
  }
}

// Calls f(StorageTag<S>{}, ModeTag<kMode>{}) for `dtype` and `mode`.
template <typename F>
void dispatch(Dtype dtype, Mode mode, F&& f) {
  dispatch_dtype(dtype, [&](auto storage) {
    switch (mode) {
      case Mode::kUpdate:
        return f(storage, ModeTag<Mode::kUpdate>{});
      case Mode::kUpdateStats:
        return f(storage, ModeTag<Mode::kUpdateStats>{});
      case Mode::kStatsOnly:
        return f(storage, ModeTag<Mode::kStatsOnly>{});
    }
  });
}

}  // namespace cuda
}  // namespace alr
