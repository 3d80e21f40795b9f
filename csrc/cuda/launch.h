// The interface between the op layer (ops.cpp, which knows torch) and the kernels (*.cu,
// which know CUDA): raw pointers, element counts and the hyper-parameters of a call.
//
// Nothing here is read on the host from device memory. The per-tensor scalars (bias
// corrections, -α/bc1, the SGD dampening weight: csrc/step_scalars.h; the
// stochastic-rounding stream) are computed by the kernels from the step counters,
// effective learning rates and rounding keys, and the GradScaler's scale, the clip coefficient and the skip flag are read by the
// kernels through DeviceScalars.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "variants.h"

namespace alr {
namespace cuda {

using alr::Dtype;
using alr::ParamWrite;
using alr::Variant;

// The storage variants with step kernels: csrc/variants.h's without float64 (which runs on
// the CPU and reference backends). Each has one Adam and one SGD kernel, whose mode and
// flags are run-time arguments; Mode::kStatsOnly never takes ParamWrite::kStochastic (it
// writes nothing; its op takes no rounding keys).
inline constexpr auto kVariants = kCudaVariants;
inline constexpr size_t kNumVariants = kVariants.size();

constexpr bool has_kernels(const Variant& variant) { return index_of_variant(kVariants, variant) >= 0; }

// Update in place; update and gather the hypergradient statistics of the state before the
// update; or only gather them (read-only). As alr::cpu::Mode; a run-time argument of the
// step kernels.
enum class Mode : int { kUpdate = 0, kUpdateStats = 1, kStatsOnly = 2 };

// The pointer rows of a tensor are algorithms.h's (num_rows: the parameter, the gradient
// (read-only), the algorithm's state streams in declaration order, the master copy or
// rounding key, the step counter, which points at a 0-d float32 or float64 counter). The
// master/key row holds the float32 master copy (a data stream laid out like the parameter)
// under ParamWrite::kMaster, the 0-d int64 rounding key under kStochastic, else nullptr: the
// two options exclude each other, so they share a row.

// Device scalars of a call (nullptr: absent). All live on the call's device.
struct DeviceScalars {
  const double* alphas;     // float64 [n]: effective learning rates κ·lr (update only)
  const float* grad_scale;  // 0-d: the GradScaler's scale, rounded to float32 (divides g)
  const float* clip_coef;   // 0-d: the clip coefficient (multiplies g)
  const bool* skip;         // 0-d: when true the kernels write nothing
  double* partials;         // [chunks, width]: per-chunk statistics (stats modes only)
};

// Hyper-parameters shared by both algorithms. Floats are the reference's `.to(opmath)`
// roundings of the Python floats; doubles feed the per-tensor scalars computed in double.
struct GradHyper {
  float grad_sign;     // -1 under maximize, else 1
  float weight_decay;  // λ of coupled decay
  bool coupled_decay;  // g += λ·p (Adam with L2 decay, SGD)
  bool steps_double;   // step counters are float64 (else float32)
};

struct AdamHyper {
  GradHyper grad;
  double beta1, beta2, eps, weight_decay;  // as given, for the per-tensor scalars
  float lerp_weight;                       // 1 - β1
  float beta2_f;                           // β2
  float one_minus_beta2;                   // 1 - β2
  float eps_f;                             // ε
  bool decoupled_decay;                    // p *= 1 - α·λ
  bool amsgrad;
};

struct SgdHyper {
  GradHyper grad;
  double dampening;
  float momentum;  // μ
  bool has_momentum;   // μ != 0: the momentum buffer is updated
  bool nesterov;
  bool store_prev;     // d_t goes to (and d_{t-1} comes from) the prev-direction row
};

// One call over n tensors: numels [n]; ptrs [n][rows] (row-major, rows = num_rows of the
// algorithm; a tensor's unused rows are nullptr). Statistics rows are laid out
// as multi_tensor.h describes; the total is num_chunks summed over the tensors.
// Mode::kStatsOnly reads the parameter (or its master) and never takes kStochastic.
void launch_adam(const Variant& variant, Mode mode, const int64_t* numels, int64_t n, void* const* ptrs,
                 const AdamHyper& hyper, const DeviceScalars& scalars, cudaStream_t stream);
void launch_sgd(const Variant& variant, Mode mode, const int64_t* numels, int64_t n, void* const* ptrs,
                const SgdHyper& hyper, const DeviceScalars& scalars, cudaStream_t stream);
// {Σ (g/S)², number of non-finite elements} per chunk into scalars.partials ([chunks, 2]).
void launch_grad_stats(Dtype dtype, const int64_t* numels, int64_t n, const void* const* grads,
                       const DeviceScalars& scalars, cudaStream_t stream);
// out[i][k] = Σ of tensor i's partial rows (in chunk order), as float32; with last_is_count
// the last column becomes 1 when its sum is positive, else 0.
void launch_sum_partials(const double* partials, const int64_t* numels, int64_t n, int width,
                         bool last_is_count, float* out, cudaStream_t stream);
// *steps[i] += 1 unless *skip (skip may be nullptr).
void launch_increment_steps(void* const* steps, int64_t n, bool steps_double, const bool* skip,
                            cudaStream_t stream);

}  // namespace cuda
}  // namespace alr
