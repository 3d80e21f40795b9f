// Device side of the multi-tensor apply: the element loops of one chunk and the
// deterministic block reduction of its statistics. Included by the kernels' .cu files.
//
// Element loop of a step. A chunk of `len` elements is read and written through its
// StepStreams: the parameter and the gradient in the parameters' storage S, kState state
// tensors in the state storage Q (nullptr for a state tensor the call does not use) and,
// under ParamWrite::kMaster, the float32 master copy. Elements go kWidth at a time, kWidth
// being 16 bytes of the widest stream (8 elements when every stream is 16-bit, else 4).
// When every stream is 16-byte aligned, thread t handles packs t, t + blockDim, ... with one
// vector load and store per stream (16 bytes; 8 for a 16-bit stream next to float ones,
// which keeps a mixed-precision step within its 64 registers), and the last len % kWidth
// elements one at a time; otherwise every element goes one at a time. The op sees every
// value in float (opmath) and does the math of alr_math.h; stores round to nearest even, or
// stochastically for the parameter under ParamWrite::kStochastic.
//
// Statistics. A thread sums its elements' contributions in float (at most 32 terms per
// chunk); the block then adds the threads' sums as doubles in a fixed tree (warp shuffles,
// then the warps' results in warp order), so a chunk's partial depends only on its data
// and on whether it took the vector path, never on scheduling.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include <c10/util/Exception.h>

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

// kWidth consecutive elements, aligned for one vector access of their size, up to 16 bytes.
template <typename T, int kWidth>
struct alignas(kWidth * sizeof(T) < 16 ? kWidth * sizeof(T) : 16) Pack {
  T v[kWidth];
};

template <int kWidth, typename T>
__device__ __forceinline__ Pack<T, kWidth> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, kWidth>*>(p);
}

// load_pack through the read-only data cache (ld.global.nc), for data that no thread of the
// kernel writes (the gradients): a 16-byte pack is one __ldg. (Besides, this form keeps
// ptxas from spilling around the division's slow-path calls in the float16 Adam kernel.)
template <int kWidth, typename T>
__device__ __forceinline__ void load_pack_read_only(Pack<T, kWidth>& pack, const T* p) {
  if constexpr (sizeof(pack) == 16) {
    const uint4 word = __ldg(reinterpret_cast<const uint4*>(p));
    std::memcpy(&pack, &word, sizeof pack);
  } else {
    pack = load_pack<kWidth>(p);
  }
}

template <int kWidth, typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, kWidth>& pack) {
  *reinterpret_cast<Pack<T, kWidth>*>(p) = pack;
}

__device__ __forceinline__ bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

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

// Calls body(offset, width) for this thread's elements of a chunk of `len`, width being
// std::integral_constant<int, n> for the n elements from offset: packs of kWidth at
// offsets kWidth·(threadIdx.x + k·blockDim.x) below len rounded down to kWidth when
// `vector`, then every remaining element alone.
template <int kWidth, typename Body>
__device__ __forceinline__ void for_each_pack(int len, bool vector, const Body& body) {
  const int vector_end = vector ? len / kWidth * kWidth : 0;
  for (int base = threadIdx.x * kWidth; base < vector_end; base += blockDim.x * kWidth) {
    body(base, std::integral_constant<int, kWidth>{});
  }
  for (int i = vector_end + threadIdx.x; i < len; i += blockDim.x) {
    body(i, std::integral_constant<int, 1>{});
  }
}

// The streams of a step over one chunk, each pointer at the chunk's first element. The
// op's x holds x[0] the parameter (read from `master` under kMaster), x[1] the gradient
// and x[2 + k] state tensor k (0 when absent); when the step writes, x[0] goes to the
// parameter as kWrite says and the present state tensors receive the rest.
template <typename S, typename Q, ParamWrite kWrite, int kState>
struct StepStreams {
  static constexpr int kStreams = 2 + kState;
  static constexpr bool kMaster = kWrite == ParamWrite::kMaster;
  static constexpr size_t kWidest = std::max({sizeof(S), sizeof(Q), kMaster ? sizeof(float) : size_t{0}});
  static constexpr int kWidth = static_cast<int>(16 / kWidest);
  static_assert(kWrite != ParamWrite::kStochastic || std::is_same_v<S, math::bf16_t>,
                "stochastic rounding writes bfloat16 parameters");

  S* param;
  const S* grad;
  Q* state[kState];
  float* master;             // kMaster: the float32 master copy
  uint32_t rounding_stream;  // kStochastic: the tensor's stream of this step
  int64_t begin;             // the chunk's first element: rounding offsets count from the tensor's

  __device__ __forceinline__ bool aligned() const {
    bool all = aligned16(param) && aligned16(grad) && (!kMaster || aligned16(master));
    for (int k = 0; k < kState; ++k) {
      all = all && aligned16(state[k]);  // nullptr counts as aligned
    }
    return all;
  }

  // Elements [offset, offset + kN): loads, op(x, acc) per element, stores when `write`.
  template <int kN, typename Op, int kSlots>
  __device__ __forceinline__ void step(int offset, bool write, const Op& op, float (&acc)[kSlots]) const {
    Pack<S, kN> p;
    Pack<float, kN> m;
    Pack<Q, kN> st[kState];
    Pack<S, kN> g;
    load_pack_read_only(g, grad + offset);
    if constexpr (kMaster) {
      m = load_pack<kN>(master + offset);
    } else {
      p = load_pack<kN>(param + offset);
    }
    for (int k = 0; k < kState; ++k) {
      if (state[k] != nullptr) {
        st[k] = load_pack<kN>(state[k] + offset);
      }
    }
#pragma unroll
    for (int e = 0; e < kN; ++e) {
      float x[kStreams];
      if constexpr (kMaster) {
        x[0] = m.v[e];
      } else {
        x[0] = math::load(&p.v[e]);
      }
      x[1] = math::load(&g.v[e]);
      for (int k = 0; k < kState; ++k) {
        x[2 + k] = state[k] != nullptr ? math::load(&st[k].v[e]) : 0.0f;
      }
      op(x, acc);
      if (write) {
        write_param(p.v[e], m.v[e], x[0], static_cast<uint64_t>(begin + offset + e));
        for (int k = 0; k < kState; ++k) {
          math::store(&st[k].v[e], x[2 + k]);
        }
      }
    }
    if (write) {
      store_pack(param + offset, p);
      if constexpr (kMaster) {
        store_pack(master + offset, m);
      }
      for (int k = 0; k < kState; ++k) {
        if (state[k] != nullptr) {
          store_pack(state[k] + offset, st[k]);
        }
      }
    }
  }

  // The new value of element `index` of the tensor into its parameter (and master) storage.
  __device__ __forceinline__ void write_param(S& stored, float& stored_master, float value, uint64_t index) const {
    if constexpr (kWrite == ParamWrite::kStochastic) {
      stored = math::float_to_bf16_stochastic(value, rounding_stream, index);
    } else {
      math::store(&stored, value);
    }
    if constexpr (kMaster) {
      stored_master = value;
    }
  }
};

// The streams of the block's chunk from rows 0 (parameter), 1 (gradient), 2 .. 1 + kState
// (state) and 2 + kState (the master copy, under kMaster) of the table.
template <typename S, typename Q, ParamWrite kWrite, int kState, typename Table>
__device__ __forceinline__ StepStreams<S, Q, kWrite, kState> step_streams(const Table& t, const ChunkOf<Table>& chunk,
                                                                          uint32_t rounding_stream) {
  StepStreams<S, Q, kWrite, kState> s;
  s.param = static_cast<S*>(t.ptrs[0][chunk.slot]) + chunk.begin;
  s.grad = static_cast<const S*>(t.ptrs[1][chunk.slot]) + chunk.begin;
  for (int k = 0; k < kState; ++k) {
    void* base = t.ptrs[2 + k][chunk.slot];
    s.state[k] = base != nullptr ? static_cast<Q*>(base) + chunk.begin : nullptr;
  }
  s.master = nullptr;
  if constexpr (kWrite == ParamWrite::kMaster) {
    s.master = static_cast<float*>(t.ptrs[2 + kState][chunk.slot]) + chunk.begin;
  }
  s.rounding_stream = rounding_stream;
  s.begin = chunk.begin;
  return s;
}

// Runs one step's op over the chunk (see StepStreams); acc accumulates the thread's
// statistics (kSlots >= 1 slots, which the op may ignore).
template <typename S, typename Q, ParamWrite kWrite, int kState, int kSlots, typename Op>
__device__ __forceinline__ void apply_chunk(const StepStreams<S, Q, kWrite, kState>& streams, int len, bool write,
                                            const Op& op, float (&acc)[kSlots]) {
  constexpr int kWidth = StepStreams<S, Q, kWrite, kState>::kWidth;
  for_each_pack<kWidth>(len, streams.aligned(), [&](int offset, auto width) {
    streams.template step<decltype(width)::value>(offset, write, op, acc);
  });
}

// Runs op(value, acc) on every element of a read-only chunk, value in float.
template <typename S, int kSlots, typename Op>
__device__ __forceinline__ void reduce_chunk(const S* data, int len, const Op& op, float (&acc)[kSlots]) {
  for_each_pack<16 / sizeof(S)>(len, aligned16(data), [&](int offset, auto width) {
    constexpr int kN = decltype(width)::value;
    Pack<S, kN> pack;
    load_pack_read_only(pack, data + offset);
#pragma unroll
    for (int e = 0; e < kN; ++e) {
      op(math::load(&pack.v[e]), acc);
    }
  });
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

// A tensor's stochastic-rounding stream of this step, as alr/reference.py's
// rounding_streams: rounding_stream(K, t) with K the 0-d int64 key (in [0, 2^32)) and
// t = int64(step counter before the step) + 1.
__device__ __forceinline__ uint32_t load_rounding_stream(const void* key, double step_before) {
  const int64_t t = static_cast<int64_t>(step_before) + 1;
  return math::rounding_stream(static_cast<uint32_t>(*static_cast<const int64_t*>(key)), static_cast<uint64_t>(t));
}

// --- Host side: template dispatch ----------------------------------------------------------

template <typename S>
struct StorageTag {
  using type = S;
};

template <Mode kMode>
using ModeTag = std::integral_constant<Mode, kMode>;

template <ParamWrite kWrite>
using WriteTag = std::integral_constant<ParamWrite, kWrite>;

template <Dtype kDtype>
struct StorageOf;
template <>
struct StorageOf<Dtype::kFloat> {
  using type = float;
};
template <>
struct StorageOf<Dtype::kBFloat16> {
  using type = math::bf16_t;
};
template <>
struct StorageOf<Dtype::kHalf> {
  using type = math::fp16_t;
};

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

// f(StorageTag<S>{}, StorageTag<Q>{}, WriteTag<kWrite>{}, ModeTag<kMode>{}) for variant I
// and `mode`; false when that mode has no kernel.
template <size_t I, typename F>
bool dispatch_mode(Mode mode, F& f) {
  constexpr Variant kVariant = kVariants[I];
  const StorageTag<typename StorageOf<kVariant.param>::type> param;
  const StorageTag<typename StorageOf<kVariant.state>::type> state;
  const WriteTag<kVariant.write> write;
  switch (mode) {
    case Mode::kUpdate:
      f(param, state, write, ModeTag<Mode::kUpdate>{});
      return true;
    case Mode::kUpdateStats:
      f(param, state, write, ModeTag<Mode::kUpdateStats>{});
      return true;
    case Mode::kStatsOnly:
      if constexpr (kVariant.write != ParamWrite::kStochastic) {
        f(param, state, write, ModeTag<Mode::kStatsOnly>{});
        return true;
      }
      return false;
  }
  return false;
}

template <typename F, size_t... I>
bool dispatch_variant(const Variant& variant, Mode mode, F& f, std::index_sequence<I...>) {
  return ((kVariants[I] == variant && dispatch_mode<I>(mode, f)) || ...);
}

// Calls f(StorageTag<S>{}, StorageTag<Q>{}, WriteTag<kWrite>{}, ModeTag<kMode>{}) for the
// parameter storage S, the state storage Q and the parameter write of `variant`, and `mode`.
template <typename F>
void dispatch(const Variant& variant, Mode mode, F&& f) {
  const bool found = dispatch_variant(variant, mode, f, std::make_index_sequence<kNumVariants>{});
  TORCH_CHECK(found, "alr: no cuda kernel for variant (", static_cast<int>(variant.param), ", ",
              static_cast<int>(variant.state), ", ", static_cast<int>(variant.write), ") in mode ",
              static_cast<int>(mode), " (ops.cpp checks has_kernels first)");
}

}  // namespace cuda
}  // namespace alr
