// The Adam/AdamW kernel: one block per chunk (apply.cuh), the element math of alr_math.h,
// templated on the parameter storage, the state storage and the parameter write (launch.h's
// Variant; apply.cuh lists those with kernels) and on the mode.
//
// Per-tensor scalars are computed by the block's first thread, in double, from the step
// counter before this update and the effective learning rate, then rounded to float:
// exactly the values alr/reference.py computes with float64 tensor ops and `.to(opmath)`
// (and that csrc/cpu/ops.cpp computes on the host).
#include <c10/cuda/CUDAException.h>

#include "cuda/apply.cuh"
#include "cuda/launch.h"

namespace alr {
namespace cuda {
namespace {

using Table = TableFor<adam_rows::kCount>::type;
constexpr int kStreams = adam_rows::kMasterOrKey;  // the data rows of the element loop
constexpr int kState = kStreams - 2;               // exp_avg, exp_avg_sq, max_exp_avg_sq
static_assert(adam_rows::kParam == 0 && adam_rows::kGrad == 1 && adam_rows::kExpAvg == 2,
              "apply.cuh's step_streams reads the rows as parameter, gradient, state, master");

struct AdamArgs {
  Table table;
  AdamHyper hyper;
  DeviceScalars scalars;
};
static_assert(sizeof(AdamHyper) + sizeof(DeviceScalars) <= kReservedArgBytes, "reserve more argument bytes");
static_assert(sizeof(AdamArgs) <= kMaxKernelArgBytes, "kernel arguments over 4 KiB");

struct TensorScalars {
  float decay_factor;           // 1 - α·λ (decoupled decay), else 1
  float bias_correction2_sqrt;  // √(1 - β2^t)
  float neg_step_size;          // -α / (1 - β1^t)
  float prev_scale;             // √(1 - β2^t') / (1 - β1^t'), t' = max(t - 1, 1)
  float prev_eps;               // ε·√(1 - β2^t')
};

// t = step_before + 1; at step 0 the previous corrections use t' = 1 (the moments are zero,
// so d_0 = 0 whatever they are, and they stay finite).
__device__ TensorScalars tensor_scalars(const AdamHyper& h, double step_before, double alpha) {
  const double t = step_before + 1;
  const double bias_correction1 = 1 - pow(h.beta1, t);
  const double bias_correction2_sqrt = sqrt(1 - pow(h.beta2, t));
  const double prev = step_before < 1 ? 1 : step_before;
  const double prev_bias_correction1 = 1 - pow(h.beta1, prev);
  const double prev_bias_correction2_sqrt = sqrt(1 - pow(h.beta2, prev));
  TensorScalars s;
  s.decay_factor = h.decoupled_decay ? static_cast<float>(1 - alpha * h.weight_decay) : 1.0f;
  s.bias_correction2_sqrt = static_cast<float>(bias_correction2_sqrt);
  s.neg_step_size = static_cast<float>(-alpha / bias_correction1);
  s.prev_scale = static_cast<float>(prev_bias_correction2_sqrt / prev_bias_correction1);
  s.prev_eps = static_cast<float>(h.eps * prev_bias_correction2_sqrt);
  return s;
}

// One element: x = {param (or its master copy), grad, exp_avg, exp_avg_sq, max_exp_avg_sq}
// in float.
template <Mode kMode>
struct AdamOp {
  static constexpr bool kWrite = kMode != Mode::kStatsOnly;
  static constexpr bool kStats = kMode != Mode::kUpdate;

  GradTransform grad;
  math::AdamScalars<float> s;
  float prev_scale;
  float prev_eps;
  bool amsgrad;

  template <int kSlots>
  __device__ __forceinline__ void operator()(float (&x)[kStreams], float (&acc)[kSlots]) const {
    using namespace adam_rows;
    float& p = x[kParam];
    float& m = x[kExpAvg];
    float& v = x[kExpAvgSq];
    float& vmax = x[kMaxExpAvgSq];
    const float g = grad(x[kGrad], p);
    if constexpr (kStats) {
      const float d = math::adam_prev_direction(m, amsgrad ? vmax : v, prev_scale, prev_eps);
      acc[0] += g * d;
      acc[1] += g * g;
      acc[2] += d * d;
    }
    if constexpr (kWrite) {
      if (amsgrad) {
        math::adam_update<true>(p, m, v, vmax, g, s);
      } else {
        math::adam_update<false>(p, m, v, vmax, g, s);
      }
    }
  }
};

template <typename S, typename Q, ParamWrite kWrite, Mode kMode>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSm) adam_kernel(const __grid_constant__ AdamArgs args) {
  using Op = AdamOp<kMode>;
  constexpr int kSlots = 3;
  const Table& t = args.table;
  const AdamHyper& h = args.hyper;
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
    const double step = load_step(t.ptrs[adam_rows::kStep][chunk.slot], h.grad.steps_double);
    shared = tensor_scalars(h, step, alpha);
    if constexpr (kWrite == ParamWrite::kStochastic) {
      shared_rounding_stream = load_rounding_stream(t.ptrs[adam_rows::kMasterOrKey][chunk.slot], step);
    }
  }
  __syncthreads();
  const TensorScalars ts = shared;

  Op op;
  op.grad = grad_transform(h.grad, args.scalars.grad_scale, args.scalars.clip_coef);
  op.s.decay_factor = ts.decay_factor;
  op.s.beta1 = math::lerp_weight(h.lerp_weight);
  op.s.beta2 = h.beta2_f;
  op.s.one_minus_beta2 = h.one_minus_beta2;
  op.s.eps = h.eps_f;
  op.s.bias_correction2_sqrt = ts.bias_correction2_sqrt;
  op.s.neg_step_size = ts.neg_step_size;
  op.prev_scale = ts.prev_scale;
  op.prev_eps = ts.prev_eps;
  op.amsgrad = h.amsgrad;

  const uint32_t rounding_stream = kWrite == ParamWrite::kStochastic ? shared_rounding_stream : 0u;
  const auto streams = step_streams<S, Q, kWrite, kState>(t, chunk, rounding_stream);
  float acc[kSlots] = {0.0f, 0.0f, 0.0f};
  apply_chunk(streams, chunk.len, write, op, acc);
  if constexpr (Op::kStats) {
    store_partials(acc, args.scalars.partials, chunk.row);
  }
}

template <typename S, typename Q, ParamWrite kWrite, Mode kMode>
void launch(const int64_t* numels, int64_t n, void* const* ptrs, const AdamHyper& hyper,
            const DeviceScalars& scalars, cudaStream_t stream) {
  AdamArgs args;
  args.hyper = hyper;
  args.scalars = scalars;
  auto set_slot = [&](int slot, int64_t i) {
    for (int r = 0; r < adam_rows::kCount; ++r) {
      args.table.ptrs[r][slot] = ptrs[i * adam_rows::kCount + r];
    }
  };
  auto run = [&](int blocks) {
    adam_kernel<S, Q, kWrite, kMode><<<blocks, kBlockThreads, 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  pack_launches(numels, n, kChunkSize, args.table, set_slot, run);
}

}  // namespace

void launch_adam(const Variant& variant, Mode mode, const int64_t* numels, int64_t n, void* const* ptrs,
                 const AdamHyper& hyper, const DeviceScalars& scalars, cudaStream_t stream) {
  dispatch(variant, mode, [&](auto param, auto state, auto write, auto mode_tag) {
    launch<typename decltype(param)::type, typename decltype(state)::type, decltype(write)::value,
           decltype(mode_tag)::value>(numels, n, ptrs, hyper, scalars, stream);
  });
}

}  // namespace cuda
}  // namespace alr
