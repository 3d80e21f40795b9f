// The SGD kernel (plain, heavy-ball or Nesterov momentum): one block per chunk (apply.cuh),
// the element math of alr_math.h, the per-tensor scalars computed as in adam.cu; templated
// like the Adam kernel on the storage variant and the mode.
#include <c10/cuda/CUDAException.h>

#include "cuda/apply.cuh"
#include "cuda/launch.h"

namespace alr {
namespace cuda {
namespace {

using Table = TableFor<sgd_rows::kCount>::type;
constexpr int kStreams = sgd_rows::kMasterOrKey;  // the data rows of the element loop
constexpr int kState = kStreams - 2;              // momentum_buffer, prev_direction
static_assert(sgd_rows::kParam == 0 && sgd_rows::kGrad == 1 && sgd_rows::kMomentumBuffer == 2,
              "apply.cuh's step_streams reads the rows as parameter, gradient, state, master");

struct SgdArgs {
  Table table;
  SgdHyper hyper;
  DeviceScalars scalars;
};
static_assert(sizeof(SgdHyper) + sizeof(DeviceScalars) <= kReservedArgBytes, "reserve more argument bytes");
static_assert(sizeof(SgdArgs) <= kMaxKernelArgBytes, "kernel arguments over 4 KiB");

struct TensorScalars {
  float damp_weight;  // 1 - dampening; 1 on the first step (step == 0) or without dampening
  float neg_lr;       // -α
};

// The reference's torch.where(first_step, 1.0, 1.0 - dampening) is a float32 tensor: the
// double 1 - dampening rounded once to float.
__device__ TensorScalars tensor_scalars(const SgdHyper& h, double step_before, double alpha) {
  TensorScalars s;
  s.damp_weight = (h.dampening == 0 || step_before == 0) ? 1.0f : static_cast<float>(1.0 - h.dampening);
  s.neg_lr = static_cast<float>(-alpha);
  return s;
}

// One element: x = {param (or its master copy), grad, momentum_buffer, prev_direction} in
// float. d_{t-1} is the previous direction when it is stored, else the momentum buffer
// before the update.
template <Mode kMode>
struct SgdOp {
  static constexpr bool kWrite = kMode != Mode::kStatsOnly;
  static constexpr bool kStats = kMode != Mode::kUpdate;

  GradTransform grad;
  math::SgdScalars<float> s;
  bool has_momentum;
  bool store_prev;

  template <int kSlots>
  __device__ __forceinline__ void operator()(float (&x)[kStreams], float (&acc)[kSlots]) const {
    using namespace sgd_rows;
    float& p = x[kParam];
    float& b = x[kMomentumBuffer];
    float& prev = x[kPrevDirection];
    const float g = grad(x[kGrad], p);
    if constexpr (kStats) {
      const float d = store_prev ? prev : b;
      acc[0] += g * d;
      acc[1] += g * g;
      acc[2] += d * d;
    }
    if constexpr (kWrite) {
      const float direction = has_momentum ? math::sgd_update<true>(p, b, g, s) : math::sgd_update<false>(p, b, g, s);
      prev = direction;  // stored only where the prev-direction row exists
    }
  }
};

template <typename S, typename Q, ParamWrite kWrite, Mode kMode>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSm) sgd_kernel(const __grid_constant__ SgdArgs args) {
  using Op = SgdOp<kMode>;
  constexpr int kSlots = 3;
  const Table& t = args.table;
  const SgdHyper& h = args.hyper;
  const ChunkOf<Table> chunk(t);
  const bool write = Op::kWrite && !skipped(args.scalars.skip);
  if (!write && !Op::kStats) {
    return;  // a skipped update: the whole block leaves before any barrier
  }
  __shared__ TensorScalars shared;
  __shared__ uint32_t shared_rounding_stream;
  if (threadIdx.x == 0) {
    const double* alphas = args.scalars.alphas;
    const double alpha = alphas != nullptr ? alphas[t.index[chunk.slot]] : 0.0;
    const double step = load_step(t.ptrs[sgd_rows::kStep][chunk.slot], h.grad.steps_double);
    shared = tensor_scalars(h, step, alpha);
    if constexpr (kWrite == ParamWrite::kStochastic) {
      shared_rounding_stream = load_rounding_stream(t.ptrs[sgd_rows::kMasterOrKey][chunk.slot], step);
    }
  }
  __syncthreads();
  const TensorScalars ts = shared;

  Op op;
  op.grad = grad_transform(h.grad, args.scalars.grad_scale, args.scalars.clip_coef);
  op.s.momentum = h.momentum;
  op.s.damp_weight = ts.damp_weight;
  op.s.nesterov = h.nesterov;
  op.s.neg_lr = ts.neg_lr;
  op.has_momentum = h.has_momentum;
  op.store_prev = h.store_prev;

  const uint32_t rounding_stream = kWrite == ParamWrite::kStochastic ? shared_rounding_stream : 0u;
  const auto streams = step_streams<S, Q, kWrite, kState>(t, chunk, rounding_stream);
  float acc[kSlots] = {0.0f, 0.0f, 0.0f};
  apply_chunk(streams, chunk.len, write, op, acc);
  if constexpr (Op::kStats) {
    store_partials(acc, args.scalars.partials, chunk.row);
  }
}

template <typename S, typename Q, ParamWrite kWrite, Mode kMode>
void launch(const int64_t* numels, int64_t n, void* const* ptrs, const SgdHyper& hyper,
            const DeviceScalars& scalars, cudaStream_t stream) {
  SgdArgs args;
  args.hyper = hyper;
  args.scalars = scalars;
  auto set_slot = [&](int slot, int64_t i) {
    for (int r = 0; r < sgd_rows::kCount; ++r) {
      args.table.ptrs[r][slot] = ptrs[i * sgd_rows::kCount + r];
    }
  };
  auto run = [&](int blocks) {
    sgd_kernel<S, Q, kWrite, kMode><<<blocks, kBlockThreads, 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  pack_launches(numels, n, kChunkSize, args.table, set_slot, run);
}

}  // namespace

void launch_sgd(const Variant& variant, Mode mode, const int64_t* numels, int64_t n, void* const* ptrs,
                const SgdHyper& hyper, const DeviceScalars& scalars, cudaStream_t stream) {
  dispatch(variant, mode, [&](auto param, auto state, auto write, auto mode_tag) {
    launch<typename decltype(param)::type, typename decltype(state)::type, decltype(write)::value,
           decltype(mode_tag)::value>(numels, n, ptrs, hyper, scalars, stream);
  });
}

}  // namespace cuda
}  // namespace alr
