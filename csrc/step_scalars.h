// The per-tensor scalars of each algorithm, one function per algorithm for the CPU op layer
// (csrc/cpu/ops.cpp, on the host) and the CUDA kernels (csrc/cuda/adam.cu, sgd.cu, on the
// device from the device step counter).
//
// They are computed in double from the step counter before the update (t = step + 1) and
// the tensor's effective learning rate α = κ·lr, exactly as alr/reference.py computes them
// with float64 tensor ops; the caller then rounds each to opmath (float for 16- and 32-bit
// storage, double for float64), as the reference's `.to(opmath)` does.
#pragma once

#include <cmath>

#include "alr_math.h"

namespace alr {
namespace scalars {

// The bias corrections of step t = step_before + 1 and of the previous step t' = max(t - 1, 1),
// which recompute d_{t-1} from the moments (alr_math.h adam_prev_direction). At step 0 the
// moments are zero, so d_0 = 0 whatever t' is; clamping keeps the corrections finite.
struct AdamCorrections {
  double bias_correction1;            // 1 - β1^t
  double bias_correction2_sqrt;       // √(1 - β2^t)
  double prev_bias_correction1;       // 1 - β1^t'
  double prev_bias_correction2_sqrt;  // √(1 - β2^t')
};

ALR_HOST_DEVICE inline AdamCorrections adam_corrections(double beta1, double beta2, double step_before) {
  const double t = step_before + 1;
  const double prev = step_before < 1 ? 1 : step_before;
  AdamCorrections c;
  c.bias_correction1 = 1 - std::pow(beta1, t);
  c.bias_correction2_sqrt = std::sqrt(1 - std::pow(beta2, t));
  c.prev_bias_correction1 = 1 - std::pow(beta1, prev);
  c.prev_bias_correction2_sqrt = std::sqrt(1 - std::pow(beta2, prev));
  return c;
}

struct AdamTensorScalars {
  double decay_factor;           // 1 - α·λ (decoupled decay), else 1 (an exact no-op)
  double bias_correction2_sqrt;  // √(1 - β2^t)
  double neg_step_size;          // -α / (1 - β1^t)
  double prev_direction_scale;   // √(1 - β2^t') / (1 - β1^t')
  double prev_direction_eps;     // ε·√(1 - β2^t')
};

// α is 0 for the read-only statistics pass, which uses only the prev_direction terms.
ALR_HOST_DEVICE inline AdamTensorScalars adam_tensor_scalars(const AdamCorrections& c, double alpha, double eps,
                                                             double weight_decay, bool decoupled_decay) {
  AdamTensorScalars s;
  s.decay_factor = decoupled_decay ? 1 - alpha * weight_decay : 1.0;
  s.bias_correction2_sqrt = c.bias_correction2_sqrt;
  s.neg_step_size = -alpha / c.bias_correction1;
  s.prev_direction_scale = c.prev_bias_correction2_sqrt / c.prev_bias_correction1;
  s.prev_direction_eps = eps * c.prev_bias_correction2_sqrt;
  return s;
}

struct SgdTensorScalars {
  double damp_weight;  // w of b = μ·b + w·g: 1 - dampening; 1 on the first step or without dampening
  double neg_lr;       // -α
};

// 1 - dampening in double, as torch's Python float; the kernels round it to opmath once.
ALR_HOST_DEVICE inline SgdTensorScalars sgd_tensor_scalars(double dampening, double step_before, double alpha) {
  SgdTensorScalars s;
  s.damp_weight = (dampening == 0 || step_before == 0) ? 1.0 : 1.0 - dampening;
  s.neg_lr = -alpha;
  return s;
}

}  // namespace scalars
}  // namespace alr
