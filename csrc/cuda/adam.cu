// The Adam/AdamW step: apply.cuh's step kernel with Adam's per-tensor scalars and element
// functor (the math of alr_math.h), one kernel per storage variant (launch.h).
//
// The per-tensor scalars are csrc/step_scalars.h's, computed by the block's first thread in
// double from the step counter before this update and the effective learning rate, then
// rounded to float: exactly the values alr/reference.py computes with float64 tensor ops
// and `.to(opmath)` (and csrc/cpu/ops.cpp computes on the host).
#include "cuda/apply.cuh"
#include "algorithms.h"
#include "cuda/launch.h"
#include "step_scalars.h"

namespace alr {
namespace cuda {
namespace {

struct Adam {
  using Hyper = AdamHyper;
  static constexpr Algorithm kAlgorithm = Algorithm::kAdam;
  static constexpr int kRows = num_rows(kAlgorithm);
  static constexpr int kStepRow = step_row(kAlgorithm);
  static constexpr int kMasterOrKeyRow = master_or_key_row(kAlgorithm);
  static constexpr int kState = num_streams(kAlgorithm);
  static constexpr int kStreams = 2 + kState;

  struct TensorScalars {
    float decay_factor;           // 1 - α·λ (decoupled decay), else 1
    float bias_correction2_sqrt;  // √(1 - β2^t)
    float neg_step_size;          // -α / (1 - β1^t)
    float prev_scale;             // √(1 - β2^t') / (1 - β1^t'), t' = max(t - 1, 1)
    float prev_eps;               // ε·√(1 - β2^t')
  };

  __device__ static TensorScalars tensor_scalars(const Hyper& h, double step_before, double alpha) {
    const scalars::AdamTensorScalars s = scalars::adam_tensor_scalars(
        scalars::adam_corrections(h.beta1, h.beta2, step_before), alpha, h.eps, h.weight_decay, h.decoupled_decay);
    TensorScalars f;
    f.decay_factor = static_cast<float>(s.decay_factor);
    f.bias_correction2_sqrt = static_cast<float>(s.bias_correction2_sqrt);
    f.neg_step_size = static_cast<float>(s.neg_step_size);
    f.prev_scale = static_cast<float>(s.prev_direction_scale);
    f.prev_eps = static_cast<float>(s.prev_direction_eps);
    return f;
  }

  // One element: x = {param (or its master copy), grad, exp_avg, exp_avg_sq, max_exp_avg_sq}
  // in float.
  struct Op {
    GradTransform grad;
    math::AdamScalars<float> s;
    float prev_scale;
    float prev_eps;
    bool amsgrad;

    template <bool kStats, int kSlots>
    __device__ __forceinline__ void apply(float (&x)[kStreams], float (&acc)[kSlots], bool write) const {
      float& p = x[kParamRow];
      float& m = x[stream_row(adam_stream::kExpAvg)];
      float& v = x[stream_row(adam_stream::kExpAvgSq)];
      float& vmax = x[stream_row(adam_stream::kMaxExpAvgSq)];
      const float g = grad(x[kGradRow], p);
      if constexpr (kStats) {
        const float d = math::adam_prev_direction(m, amsgrad ? vmax : v, prev_scale, prev_eps);
        acc[0] += g * d;
        acc[1] += g * g;
        acc[2] += d * d;
      }
      if (!write) {
        return;
      }
      if (amsgrad) {
        math::adam_update<true>(p, m, v, vmax, g, s);
      } else {
        math::adam_update<false>(p, m, v, vmax, g, s);
      }
    }
  };

  __device__ static Op make_op(const Hyper& h, const TensorScalars& ts, const GradTransform& grad) {
    Op op;
    op.grad = grad;
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
    return op;
  }
};


}  // namespace

void launch_adam(const Variant& variant, Mode mode, const int64_t* numels, int64_t n, void* const* ptrs,
                 const AdamHyper& hyper, const DeviceScalars& scalars, cudaStream_t stream) {
  launch_step<Adam>(variant, mode, numels, n, ptrs, hyper, scalars, stream);
}

}  // namespace cuda
}  // namespace alr
