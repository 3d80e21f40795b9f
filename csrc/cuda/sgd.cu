// The SGD step (plain, heavy-ball or Nesterov momentum): apply.cuh's step kernel with SGD's
// per-tensor scalars (csrc/step_scalars.h, computed as in adam.cu) and element functor (the
// math of alr_math.h), one kernel per storage variant (launch.h).
#include "cuda/apply.cuh"
#include "algorithms.h"
#include "cuda/launch.h"
#include "step_scalars.h"

namespace alr {
namespace cuda {
namespace {

struct Sgd {
  using Hyper = SgdHyper;
  static constexpr Algorithm kAlgorithm = Algorithm::kSgd;
  static constexpr int kRows = num_rows(kAlgorithm);
  static constexpr int kStepRow = step_row(kAlgorithm);
  static constexpr int kMasterOrKeyRow = master_or_key_row(kAlgorithm);
  static constexpr int kState = num_streams(kAlgorithm);
  static constexpr int kStreams = 2 + kState;

  struct TensorScalars {
    float damp_weight;  // 1 - dampening; 1 on the first step (step == 0) or without dampening
    float neg_lr;       // -α
  };

  __device__ static TensorScalars tensor_scalars(const Hyper& h, double step_before, double alpha) {
    const scalars::SgdTensorScalars s = scalars::sgd_tensor_scalars(h.dampening, step_before, alpha);
    TensorScalars f;
    f.damp_weight = static_cast<float>(s.damp_weight);
    f.neg_lr = static_cast<float>(s.neg_lr);
    return f;
  }

  // One element: x = {param (or its master copy), grad, momentum_buffer, prev_direction} in
  // float. d_{t-1} is the previous direction when it is stored, else the momentum buffer
  // before the update.
  struct Op {
    GradTransform grad;
    math::SgdScalars<float> s;
    bool has_momentum;
    bool store_prev;

    template <bool kStats, int kSlots>
    __device__ __forceinline__ void apply(float (&x)[kStreams], float (&acc)[kSlots], bool write) const {
      float& p = x[kParamRow];
      float& b = x[stream_row(sgd_stream::kMomentumBuffer)];
      float& prev = x[stream_row(sgd_stream::kPrevDirection)];
      const float g = grad(x[kGradRow], p);
      if constexpr (kStats) {
        const float d = store_prev ? prev : b;
        acc[0] += g * d;
        acc[1] += g * g;
        acc[2] += d * d;
      }
      if (!write) {
        return;
      }
      const float direction = has_momentum ? math::sgd_update<true>(p, b, g, s) : math::sgd_update<false>(p, b, g, s);
      prev = direction;  // stored only where the prev-direction row exists
    }
  };

  __device__ static Op make_op(const Hyper& h, const TensorScalars& ts, const GradTransform& grad) {
    Op op;
    op.grad = grad;
    op.s.momentum = h.momentum;
    op.s.damp_weight = ts.damp_weight;
    op.s.nesterov = h.nesterov;
    op.s.neg_lr = ts.neg_lr;
    op.has_momentum = h.has_momentum;
    op.store_prev = h.store_prev;
    return op;
  }
};


}  // namespace

void launch_sgd(const Variant& variant, Mode mode, const int64_t* numels, int64_t n, void* const* ptrs,
                const SgdHyper& hyper, const DeviceScalars& scalars, cudaStream_t stream) {
  launch_step<Sgd>(variant, mode, numels, n, ptrs, hyper, scalars, stream);
}

}  // namespace cuda
}  // namespace alr
