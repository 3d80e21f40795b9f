// The multi-tensor apply: the element loops of one chunk, the deterministic block reduction
// of its statistics, and the one step kernel (step_kernel) with its launcher, which every
// algorithm instantiates with its element functor (adam.cu, sgd.cu). Included by the
// kernels' .cu files.
//
// Step kernel. One kernel per algorithm and storage variant (launch.h): a block takes one
// chunk, its first thread computes the tensor's scalars in double (csrc/step_scalars.h)
// from the device step counter and κ·lr, the block runs the algorithm's element functor
// over the chunk and, unless the mode is Mode::kUpdate, stores the chunk's statistics. The
// mode is a run-time argument: the kernel branches once, outside the element loop, to a
// loop with or without the statistics; whether the loop writes (not Mode::kStatsOnly, and
// not a skipped step) is a uniform run-time flag of the loop.
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

#include <c10/cuda/CUDAException.h>
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

  // Elements [offset, offset + kN): loads, op.apply<kStats>(x, acc, write) per element,
  // stores when `write`.
  template <int kN, bool kStats, typename Op, int kSlots>
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
      op.template apply<kStats>(x, acc, write);
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

// Runs one step's op over the chunk (see StepStreams); with kStats, acc accumulates the
// thread's statistics (kSlots slots).
template <bool kStats, typename S, typename Q, ParamWrite kWrite, int kState, int kSlots, typename Op>
__device__ __forceinline__ void apply_chunk(const StepStreams<S, Q, kWrite, kState>& streams, int len, bool write,
                                            const Op& op, float (&acc)[kSlots]) {
  constexpr int kWidth = StepStreams<S, Q, kWrite, kState>::kWidth;
  for_each_pack<kWidth>(len, streams.aligned(), [&](int offset, auto width) {
    streams.template step<decltype(width)::value, kStats>(offset, write, op, acc);
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

// --- The step kernel ------------------------------------------------------------------------
//
// An algorithm A (adam.cu's Adam, sgd.cu's Sgd) provides:
//   A::Hyper           its hyper-parameters (launch.h), with the GradHyper `grad`;
//   A::kRows, A::kState, A::kStepRow, A::kMasterOrKeyRow   its pointer rows (launch.h): the
//                      parameter, the gradient, kState state tensors, the master copy or the
//                      rounding key, the step counter;
//   A::TensorScalars   per-tensor floats, computed by A::tensor_scalars(hyper, step_before,
//                      alpha) on the block's first thread;
//   A::Op              the element functor, A::make_op(hyper, tensor_scalars, grad_transform),
//                      with `template <bool kStats, int kSlots> void apply(float (&x)[2 + kState],
//                      float (&acc)[kSlots], bool write) const` (StepStreams says what x holds).

constexpr int kStepStats = 3;  // g·d_{t-1}, g·g, d_{t-1}·d_{t-1}

template <typename A>
using KernelTableOf = typename TableFor<A::kRows>::type;

template <typename A>
struct StepKernelArgs {
  KernelTableOf<A> table;
  typename A::Hyper hyper;
  DeviceScalars scalars;
  Mode mode;
};

template <typename A, typename S, typename Q, ParamWrite kWrite>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSm) step_kernel(const __grid_constant__ StepKernelArgs<A> args) {
  static_assert(A::kMasterOrKeyRow == 2 + A::kState && A::kStepRow == A::kRows - 1,
                "step_streams reads the rows as parameter, gradient, state, master; the step comes last");
  const KernelTableOf<A>& t = args.table;
  const ChunkOf<KernelTableOf<A>> chunk(t);
  const bool stats = args.mode != Mode::kUpdate;
  const bool write = args.mode != Mode::kStatsOnly && !skipped(args.scalars.skip);
  if (!write && !stats) {
    return;  // a skipped update: the whole block leaves before any barrier
  }
  __shared__ typename A::TensorScalars shared;
  __shared__ uint32_t shared_rounding_stream;
  if (threadIdx.x == 0) {
    const double* alphas = args.scalars.alphas;
    const double alpha = alphas != nullptr ? alphas[t.index[chunk.slot]] : 0.0;
    const double step = load_step(t.ptrs[A::kStepRow][chunk.slot], args.hyper.grad.steps_double);
    shared = A::tensor_scalars(args.hyper, step, alpha);
    if constexpr (kWrite == ParamWrite::kStochastic) {
      // The key row is null for the read-only statistics (the op layer never sends them here).
      shared_rounding_stream = args.mode != Mode::kStatsOnly
                                   ? load_rounding_stream(t.ptrs[A::kMasterOrKeyRow][chunk.slot], step)
                                   : 0u;
    }
  }
  __syncthreads();
  const typename A::Op op =
      A::make_op(args.hyper, shared, grad_transform(args.hyper.grad, args.scalars.grad_scale, args.scalars.clip_coef));
  const uint32_t rounding_stream = kWrite == ParamWrite::kStochastic ? shared_rounding_stream : 0u;
  const auto streams = step_streams<S, Q, kWrite, A::kState>(t, chunk, rounding_stream);
  float acc[kStepStats] = {0.0f, 0.0f, 0.0f};
  // `stats` is the same for every block of the launch, so the barriers of store_partials are
  // reached by all threads or by none.
  if (stats) {
    apply_chunk<true>(streams, chunk.len, write, op, acc);
    store_partials(acc, args.scalars.partials, chunk.row);
  } else {
    apply_chunk<false>(streams, chunk.len, write, op, acc);
  }
}

// Packs the call's tensors into launches of step_kernel<A, S, Q, kWrite> (multi_tensor.h).
template <typename A, typename S, typename Q, ParamWrite kWrite>
void launch_step_typed(Mode mode, const int64_t* numels, int64_t n, void* const* ptrs, const typename A::Hyper& hyper,
                       const DeviceScalars& scalars, cudaStream_t stream) {
  static_assert(sizeof(typename A::Hyper) + sizeof(DeviceScalars) + sizeof(Mode) <= kReservedArgBytes,
                "reserve more argument bytes");
  static_assert(sizeof(StepKernelArgs<A>) <= kMaxKernelArgBytes, "kernel arguments over 4 KiB");
  StepKernelArgs<A> args;
  args.hyper = hyper;
  args.scalars = scalars;
  args.mode = mode;
  auto set_slot = [&](int slot, int64_t i) {
    for (int r = 0; r < A::kRows; ++r) {
      args.table.ptrs[r][slot] = ptrs[i * A::kRows + r];
    }
  };
  auto run = [&](int blocks) {
    step_kernel<A, S, Q, kWrite><<<blocks, kBlockThreads, 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  pack_launches(numels, n, kChunkSize, args.table, set_slot, run);
}

// --- Host side: template dispatch ----------------------------------------------------------

template <typename S>
struct StorageTag {
  using type = S;
};

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
    case Dtype::kDouble:
      break;
  }
  TORCH_CHECK(false, "alr: the cuda kernels take no float64 (ops.cpp rejects it first)");
}

// f(StorageTag<S>{}, StorageTag<Q>{}, WriteTag<kWrite>{}) for variant I.
template <size_t I, typename F>
void dispatch_variant_at(F& f) {
  constexpr Variant kVariant = kVariants[I];
  f(StorageTag<typename StorageOf<kVariant.param>::type>{}, StorageTag<typename StorageOf<kVariant.state>::type>{},
    WriteTag<kVariant.write>{});
}

template <typename F, size_t... I>
bool dispatch_variant(const Variant& variant, F& f, std::index_sequence<I...>) {
  return ((kVariants[I] == variant && (dispatch_variant_at<I>(f), true)) || ...);
}

// Calls f(StorageTag<S>{}, StorageTag<Q>{}, WriteTag<kWrite>{}) for the parameter storage S,
// the state storage Q and the parameter write of `variant`.
template <typename F>
void dispatch(const Variant& variant, F&& f) {
  const bool found = dispatch_variant(variant, f, std::make_index_sequence<kNumVariants>{});
  TORCH_CHECK(found, "alr: no cuda kernel for variant (", static_cast<int>(variant.param), ", ",
              static_cast<int>(variant.state), ", ", static_cast<int>(variant.write),
              ") (ops.cpp checks has_kernels first)");
}

// Launches algorithm A's step kernel of `variant` over the call (see launch.h launch_adam).
template <typename A>
void launch_step(const Variant& variant, Mode mode, const int64_t* numels, int64_t n, void* const* ptrs,
                 const typename A::Hyper& hyper, const DeviceScalars& scalars, cudaStream_t stream) {
  dispatch(variant, [&](auto param, auto state, auto write) {
    launch_step_typed<A, typename decltype(param)::type, typename decltype(state)::type, decltype(write)::value>(
        mode, numels, n, ptrs, hyper, scalars, stream);
  });
}

}  // namespace cuda
}  // namespace alr
