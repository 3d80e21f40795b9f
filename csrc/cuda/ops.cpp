// CUDA implementations of the alr ops (schemas in csrc/registration.cpp), registered under
// the CUDA dispatch key of the same operators as the CPU kernels.
//
// One call handles one bucket: every tensor of one (device, dtype) of a param group, on
// the current stream of that device. The host side validates the tensors, collects their
// data pointers and launches the kernels of adam.cu / sgd.cu / stats.cu; it never reads a
// device tensor. Step counters, effective learning rates, the GradScaler's scale, the clip
// coefficient and the skip flag are read by the kernels (see launch.h), so a call neither
// synchronises with the host nor copies from it, and can be captured in a CUDA graph.
//
// Statistics are per-chunk partials (float64 [chunks, width]) summed per tensor in chunk
// order by a second kernel: the [n, width] float32 result is deterministic.
//
// Low precision: the state tensors share one dtype (the parameters', float32 or bfloat16);
// float32 master copies are read instead of the parameters and receive the new values,
// the parameters their images rounded to nearest; without masters, bfloat16 parameters may
// be rounded stochastically, the kernels reading each tensor's 0-d int64 rounding key on
// the device like the step counters.
//
// Layouts, as on the CPU: a tensor runs as flat memory when it is dense and its gradient
// and state have its layout (strides of size-1 dimensions ignored); otherwise the
// mismatching tensors are staged through device temporaries in the parameter's layout
// (contiguous when the parameter is not dense), and the updated ones are copied back.
#include <deque>
#include <initializer_list>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include "cuda/launch.h"
#include "cuda/multi_tensor.h"
#include "op_inputs.h"

namespace alr {
namespace cuda {
namespace {

using at::Tensor;
using at::TensorList;
using ops::check_list;
using ops::check_matches;
using ops::check_state;
using ops::Hyper;
using ops::Staging;
using ops::State;

constexpr int kHypergradStats = 3;
constexpr int kGradStats = 2;

Dtype dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return Dtype::kFloat;
    case at::kBFloat16:
      return Dtype::kBFloat16;
    case at::kHalf:
      return Dtype::kHalf;
    default:
      TORCH_CHECK(false, "alr: the cuda backend takes float32, bfloat16 or float16 parameters, got ", t,
                  " (float64 runs on the cpu and reference backends)");
  }
}

// One CUDA device and one supported dtype for the whole list.
Dtype check_params(TensorList params, const char* name) {
  TORCH_CHECK(!params.empty(), "alr: a bucket needs at least one parameter");
  const Tensor& first = params[0];
  TORCH_CHECK(first.is_cuda(), "alr: ", name, "[0] must be a CUDA tensor, got ", first.device());
  for (const auto i : c10::irange(params.size())) {
    TORCH_CHECK(params[i].device() == first.device(), "alr: a bucket has one device, but ", name, "[", i,
                "] is on ", params[i].device(), " and ", name, "[0] on ", first.device());
    TORCH_CHECK(params[i].scalar_type() == first.scalar_type(), "alr: a bucket has one dtype, but ", name, "[",
                i, "] is ", params[i].scalar_type(), " and ", name, "[0] is ", first.scalar_type());
  }
  return dtype_of(first.scalar_type());
}

// Whether the step counters are float64 (else float32): one-element tensors on the device.
bool check_steps(TensorList steps, const at::Device& device) {
  const auto dtype = steps[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "alr: steps must be float32 or float64, got ", dtype);
  for (const auto i : c10::irange(steps.size())) {
    TORCH_CHECK(steps[i].device() == device && steps[i].numel() == 1 && steps[i].scalar_type() == dtype, "alr: steps[",
                i, "] must be a one-element ", dtype, " tensor on ", device);
  }
  return dtype == at::kDouble;
}

// A one-element device scalar in `dtype` (a no-op when it already is), or nothing.
std::optional<Tensor> device_scalar(const std::optional<Tensor>& t, const at::Device& device,
                                    at::ScalarType dtype, const char* name) {
  if (!t.has_value()) {
    return std::nullopt;
  }
  TORCH_CHECK(t->device() == device, "alr: ", name, " must be on ", device, " with the parameters, got ",
              t->device());
  TORCH_CHECK(t->numel() == 1, "alr: ", name, " must have one element, got ", t->numel());
  return t->to(dtype).contiguous();
}

template <typename T>
const T* data_or_null(const std::optional<Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

// The hyper-parameters the ops take as keyword arguments.

GradHyper grad_hyper(const Hyper& h, bool steps_double) {
  GradHyper g{};
  g.grad_sign = h.maximize ? -1.0f : 1.0f;
  g.weight_decay = static_cast<float>(h.weight_decay);
  g.coupled_decay = h.weight_decay != 0 && !(h.algorithm == Algorithm::kAdam && h.decoupled_weight_decay);
  g.steps_double = steps_double;
  return g;
}

AdamHyper adam_hyper(const Hyper& h, bool steps_double) {
  AdamHyper a{};
  a.grad = grad_hyper(h, steps_double);
  a.beta1 = h.beta1;
  a.beta2 = h.beta2;
  a.eps = h.eps;
  a.weight_decay = h.weight_decay;
  a.lerp_weight = static_cast<float>(1 - h.beta1);
  a.beta2_f = static_cast<float>(h.beta2);
  a.one_minus_beta2 = static_cast<float>(1 - h.beta2);
  a.eps_f = static_cast<float>(h.eps);
  a.decoupled_decay = h.weight_decay != 0 && h.decoupled_weight_decay;
  a.amsgrad = h.amsgrad;
  return a;
}

SgdHyper sgd_hyper(const Hyper& h, bool steps_double) {
  SgdHyper s{};
  s.grad = grad_hyper(h, steps_double);
  s.dampening = h.dampening;
  s.momentum = static_cast<float>(h.momentum);
  s.has_momentum = h.momentum != 0;
  s.nesterov = h.nesterov;
  s.store_prev = h.needs_prev_direction;
  return s;
}

// --- Calls ---------------------------------------------------------------------------------

int64_t total_chunks(const std::vector<int64_t>& numels) {
  int64_t rows = 0;
  for (const int64_t numel : numels) {
    rows += num_chunks(numel, kChunkSize);
  }
  return rows;
}

// float32 [n, width] per-tensor sums of `partials` (see launch_sum_partials).
Tensor sum_partials(const Tensor& partials, const std::vector<int64_t>& numels, int width, bool last_is_count) {
  const int64_t n = static_cast<int64_t>(numels.size());
  Tensor out = at::empty({n, width}, partials.options().dtype(at::kFloat));
  launch_sum_partials(partials.const_data_ptr<double>(), numels.data(), n, width, last_is_count,
                      out.mutable_data_ptr<float>(), c10::cuda::getCurrentCUDAStream());
  return out;
}

// The kernels' variant for a bucket (launch.h): the parameters' and the state's dtypes, and
// how the parameters are written (into masters, stochastically or to nearest).
Variant variant_of(at::ScalarType param_dtype, at::ScalarType state_dtype, const State& st) {
  const ParamWrite write = !st.master_params.empty()   ? ParamWrite::kMaster
                           : !st.rounding_keys.empty() ? ParamWrite::kStochastic
                                                       : ParamWrite::kNearest;
  const Variant variant{dtype_of(param_dtype), dtype_of(state_dtype), write};
  TORCH_CHECK(has_kernels(variant), "alr: the cuda backend has no kernel for ", param_dtype, " parameters with ",
              state_dtype, " state");
  return variant;
}

// The pointer rows of every tensor for one kernel call, with the staged temporaries.
struct Call {
  std::vector<int64_t> numels;
  std::vector<void*> ptrs;  // [n][rows]
  Staging staging;

  Call(int64_t n, int rows) : numels(n, 0), ptrs(n * rows, nullptr) {}
};

// The rows of tensor i (algorithms.h): the parameter (or its staged reference), the
// gradient, the state streams the call reads, the master copy or the rounding key, the step
// counter. Data streams are staged to the reference's layout when needed (and copied back
// when the call writes); the rows of streams the call does not read stay null.
void fill_rows(Call& call, int64_t i, int rows, const Hyper& h, bool write, const Tensor& param, const Tensor& grad,
               const State& st, const Variant& variant, const Tensor& step) {
  void** row = call.ptrs.data() + i * rows;
  row[step_row(h.algorithm)] = step.data_ptr();
  if (variant.write == ParamWrite::kStochastic) {
    row[master_or_key_row(h.algorithm)] = const_cast<void*>(st.rounding_keys[i].const_data_ptr());
  }
  call.numels[i] = param.numel();
  if (param.numel() == 0) {
    return;
  }
  const Tensor& ref = call.staging.reference(param, write);
  const auto stage = [&](const Tensor& t, bool mutated) {
    return const_cast<void*>(call.staging.stage(t, ref, write && mutated).const_data_ptr());
  };
  row[kParamRow] = ref.data_ptr();
  row[kGradRow] = stage(grad, false);
  for (int k = 0; k < num_streams(h.algorithm); ++k) {
    if (ops::reads_stream(h, k, write)) {
      row[stream_row(k)] = stage(st[k][i], true);
    }
  }
  if (variant.write == ParamWrite::kMaster) {
    row[master_or_key_row(h.algorithm)] = stage(st.master_params[i], true);
  }
}

// Runs `mode` over the bucket; returns the [n, 3] statistics (undefined for Mode::kUpdate).
Tensor step_call(const Hyper& h, const Variant& variant, TensorList params, TensorList grads, TensorList steps,
                 const State& st, DeviceScalars scalars, Mode mode) {
  const int64_t n = static_cast<int64_t>(params.size());
  const bool write = mode != Mode::kStatsOnly;
  const bool stats = mode != Mode::kUpdate;
  const bool steps_double = check_steps(steps, params[0].device());
  const int rows = num_rows(h.algorithm);
  Call call(n, rows);
  for (const auto i : c10::irange(n)) {
    fill_rows(call, i, rows, h, write, params[i], grads[i], st, variant, steps[i]);
  }
  Tensor partials;
  if (stats) {
    partials = at::empty({total_chunks(call.numels), kHypergradStats}, params[0].options().dtype(at::kDouble));
    scalars.partials = partials.mutable_data_ptr<double>();
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (h.algorithm == Algorithm::kAdam) {
    launch_adam(variant, mode, call.numels.data(), n, call.ptrs.data(), adam_hyper(h, steps_double), scalars,
                stream);
  } else {
    launch_sgd(variant, mode, call.numels.data(), n, call.ptrs.data(), sgd_hyper(h, steps_double), scalars, stream);
  }
  call.staging.finish();
  return stats ? sum_partials(partials, call.numels, kHypergradStats, false) : Tensor();
}

void increment_steps(TensorList steps, const bool* skip) {
  std::vector<void*> ptrs;
  ptrs.reserve(steps.size());
  for (const Tensor& step : steps) {
    ptrs.push_back(step.data_ptr());
  }
  launch_increment_steps(ptrs.data(), static_cast<int64_t>(ptrs.size()), steps[0].scalar_type() == at::kDouble,
                         skip, c10::cuda::getCurrentCUDAStream());
}

// --- Ops -----------------------------------------------------------------------------------

Tensor grad_stats_cuda(TensorList grads, const std::optional<Tensor>& grad_scale) {
  const Dtype d = check_params(grads, "grads");
  const c10::cuda::CUDAGuard guard(grads[0].device());
  const int64_t n = static_cast<int64_t>(grads.size());
  const auto scale = device_scalar(grad_scale, grads[0].device(), at::kFloat, "grad_scale");
  std::vector<int64_t> numels(n);
  std::vector<const void*> ptrs(n, nullptr);
  Staging staging;
  for (const auto i : c10::irange(n)) {
    numels[i] = grads[i].numel();
    if (numels[i] > 0) {
      // A reduction reads memory in any order: only dense storage is needed.
      ptrs[i] = staging.reference(grads[i], /*mutated=*/false).const_data_ptr();
    }
  }
  Tensor partials = at::empty({total_chunks(numels), kGradStats}, grads[0].options().dtype(at::kDouble));
  DeviceScalars scalars{};
  scalars.grad_scale = data_or_null<float>(scale);
  scalars.partials = partials.mutable_data_ptr<double>();
  launch_grad_stats(d, numels.data(), n, ptrs.data(), scalars, c10::cuda::getCurrentCUDAStream());
  return sum_partials(partials, numels, kGradStats, /*last_is_count=*/true);
}

// The statistics-only implementation behind the typed *_hypergrad_stats ops (op_inputs.h).
Tensor hypergrad_stats(const Hyper& h, TensorList params, TensorList grads, TensorList steps, const State& st,
                       const std::optional<Tensor>& grad_scale, const std::optional<Tensor>& clip_coef) {
  check_params(params, "params");
  const at::Device device = params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const at::ScalarType state_dtype = check_state(h, params, grads, steps, st, /*need_stats_source=*/true);
  const Variant variant = variant_of(params[0].scalar_type(), state_dtype, st);
  const auto scale = device_scalar(grad_scale, device, at::kFloat, "grad_scale");
  const auto clip = device_scalar(clip_coef, device, at::kFloat, "clip_coef");
  DeviceScalars scalars{};
  scalars.grad_scale = data_or_null<float>(scale);
  scalars.clip_coef = data_or_null<float>(clip);
  return step_call(h, variant, params, grads, steps, st, scalars, Mode::kStatsOnly);
}

// The implementation behind the typed *_update_ ops (op_inputs.h).
Tensor update(const Hyper& h, TensorList params, TensorList grads, TensorList steps, const State& st,
              const Tensor& alphas, const std::optional<Tensor>& grad_scale, const std::optional<Tensor>& clip_coef,
              const std::optional<Tensor>& skip, bool collect_stats) {
  const int64_t n = static_cast<int64_t>(params.size());
  if (n == 0) {
    return at::zeros({0, kHypergradStats}, alphas.options().dtype(at::kFloat));
  }
  check_params(params, "params");
  const at::Device device = params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const at::ScalarType state_dtype = check_state(h, params, grads, steps, st, collect_stats);
  const Variant variant = variant_of(params[0].scalar_type(), state_dtype, st);
  TORCH_CHECK(alphas.device() == device && alphas.numel() == n, "alr: alphas must be a tensor of ", n,
              " elements on ", device, ", got ", alphas.numel(), " on ", alphas.device());
  const Tensor alphas64 = alphas.to(at::kDouble).contiguous();
  const auto scale = device_scalar(grad_scale, device, at::kFloat, "grad_scale");
  const auto clip = device_scalar(clip_coef, device, at::kFloat, "clip_coef");
  const auto skip_flag = device_scalar(skip, device, at::kBool, "skip");
  DeviceScalars scalars{};
  scalars.alphas = alphas64.const_data_ptr<double>();
  scalars.grad_scale = data_or_null<float>(scale);
  scalars.clip_coef = data_or_null<float>(clip);
  scalars.skip = data_or_null<bool>(skip_flag);
  const Mode mode = collect_stats ? Mode::kUpdateStats : Mode::kUpdate;
  Tensor stats = step_call(h, variant, params, grads, steps, st, scalars, mode);
  increment_steps(steps, scalars.skip);
  return collect_stats ? stats : at::empty({0, kHypergradStats}, alphas.options().dtype(at::kFloat));
}

}  // namespace

TORCH_LIBRARY_IMPL(alr, CUDA, m) {
  using Ops = ops::TypedOps<&hypergrad_stats, &update>;
  m.impl("grad_stats", &grad_stats_cuda);
  m.impl("adam_hypergrad_stats", &Ops::adam_hypergrad_stats);
  m.impl("sgd_hypergrad_stats", &Ops::sgd_hypergrad_stats);
  m.impl("adam_update_", &Ops::adam_update_);
  m.impl("sgd_update_", &Ops::sgd_update_);
}

}  // namespace cuda
}  // namespace alr
