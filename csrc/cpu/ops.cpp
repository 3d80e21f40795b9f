// CPU implementations of the alr ops (schemas in csrc/registration.cpp).
//
// One call handles one bucket: every tensor of one (device, dtype) of a param group. The
// host side of the op reads the per-tensor scalars (step counters, effective learning
// rates, the GradScaler scale, the clip coefficient, the skip flag) from their CPU tensors
// (no synchronisation: they are CPU tensors), computes the bias corrections in double
// exactly like alr/reference.py, and builds one argument record per tensor. The elements
// of all tensors are then cut into segments (multi_tensor.h) that at::parallel_for runs
// across torch's intra-op threads; each segment writes its partial statistics to its own
// slot, and the slots are summed per tensor in segment order (deterministic for any
// number of threads).
//
// Layouts. A tensor is processed as flat memory when it is dense and non-overlapping and
// every tensor at its position (grad, state) has the same layout (strides of size-1
// dimensions ignored): the common case, including transposed and channels-last
// parameters whose gradient and state follow the parameter's layout (autograd and
// zeros_like(preserve_format) make them so). Otherwise the mismatching tensors are staged
// through a temporary in the parameter's layout (contiguous when the parameter is not
// dense): one extra read and write of each staged tensor, plus the temporary's memory,
// and a copy back for the ones the op updates.
#include <cmath>
#include <cstring>
#include <deque>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <ATen/ops/zeros.h>
#include <c10/util/irange.h>
#include <pybind11/pybind11.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include "alr_math.h"
#include "cpu/kernels.h"
#include "cpu/multi_tensor.h"
#include "op_inputs.h"

namespace alr {
namespace cpu {
namespace {

using at::Tensor;
using at::TensorList;
using ops::check_list;
using ops::check_state;
using ops::Hyper;
using ops::Staging;
using ops::State;

Dtype dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return Dtype::kFloat;
    case at::kDouble:
      return Dtype::kDouble;
    case at::kBFloat16:
      return Dtype::kBFloat16;
    case at::kHalf:
      return Dtype::kHalf;
    default:
      TORCH_CHECK(false, "alr: parameters must be float32, float64, bfloat16 or float16, got ", t);
  }
}

bool is_double(Dtype d) { return d == Dtype::kDouble; }

// The value of a one-element CPU tensor, as the reference's `.to(opmath)` sees it: read
// in its own dtype, then (by the caller) rounded to opmath.
double scalar_value(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "alr: ", name, " must be a CPU tensor for the cpu backend, got ",
              t.device());
  TORCH_CHECK(t.numel() == 1, "alr: ", name, " must have one element, got ", t.numel());
  switch (t.scalar_type()) {
    case at::kFloat:
      return *t.const_data_ptr<float>();
    case at::kDouble:
      return *t.const_data_ptr<double>();
    case at::kBool:
      return *t.const_data_ptr<bool>() ? 1.0 : 0.0;
    default:
      return t.item<double>();
  }
}

// Rounds a double to what the reference's `.to(opmath)` gives: float for 16/32-bit storage.
double to_opmath(double x, Dtype d) { return is_double(d) ? x : static_cast<double>(static_cast<float>(x)); }

Dtype check_params(TensorList params) {
  TORCH_CHECK(!params.empty(), "alr: a bucket needs at least one parameter");
  const auto dtype = params[0].scalar_type();
  for (const auto i : c10::irange(params.size())) {
    TORCH_CHECK(params[i].device().is_cpu(), "alr: params[", i, "] must be on the CPU, got ",
                params[i].device());
    TORCH_CHECK(params[i].scalar_type() == dtype, "alr: a bucket has one dtype, but params[", i,
                "] is ", params[i].scalar_type(), " and params[0] is ", dtype);
  }
  return dtype_of(dtype);
}

double step_value(const Tensor& step, size_t i) {
  TORCH_CHECK(step.device().is_cpu() && step.numel() == 1, "alr: steps[", i,
              "] must be a one-element CPU tensor");
  if (step.scalar_type() == at::kFloat) {
    return *step.const_data_ptr<float>();
  }
  TORCH_CHECK(step.scalar_type() == at::kDouble, "alr: steps[", i, "] must be float32 or float64");
  return *step.const_data_ptr<double>();
}

void increment_steps(TensorList steps) {
  for (const Tensor& step : steps) {
    if (step.scalar_type() == at::kFloat) {
      float* p = step.mutable_data_ptr<float>();
      *p = *p + 1.0f;
    } else {
      double* p = step.mutable_data_ptr<double>();
      *p = *p + 1.0;
    }
  }
}


GradArgs grad_args(const Hyper& h, double grad_scale, double clip, Dtype d) {
  GradArgs g{};
  g.grad_scale = to_opmath(grad_scale, d);
  // -(g·c) == g·(-c) exactly, and g·1 == g: maximize and clipping fold into one factor.
  g.grad_mult = to_opmath(clip, d) * (h.maximize ? -1.0 : 1.0);
  g.coupled_decay = h.weight_decay != 0 && !(h.adam && h.decoupled_weight_decay);
  g.weight_decay = to_opmath(h.weight_decay, d);
  return g;
}

// The kernels' variant for a bucket: the parameters' and the state's dtypes, and how the
// parameters are written.
int variant_of(at::ScalarType param_dtype, at::ScalarType state_dtype, const State& st) {
  const ParamWrite write = !st.master_params.empty()   ? ParamWrite::kMaster
                           : !st.rounding_keys.empty() ? ParamWrite::kStochastic
                                                       : ParamWrite::kNearest;
  const int v = variant_index(dtype_of(param_dtype), dtype_of(state_dtype), write);
  TORCH_CHECK(v >= 0, "alr: the cpu backend has no kernel for ", param_dtype, " parameters with ", state_dtype,
              " state");
  return v;
}

// Where a tensor's new parameter value goes: its kernel's ParamArgs.
ParamArgs param_args(const Tensor& ref, const Tensor& step_counter, const State& st, size_t i, Staging& staging,
                     bool write) {
  ParamArgs a{};
  a.param = ref.data_ptr();
  if (!st.master_params.empty()) {
    a.master = staging.stage(st.master_params[i], ref, write).data_ptr<float>();
  }
  if (!st.rounding_keys.empty()) {
    const Tensor& key = st.rounding_keys[i];
    TORCH_CHECK(key.device().is_cpu(), "alr: rounding_keys[", i, "] must be a CPU tensor for the cpu backend");
    // The step being taken, as the reference's float-to-int64 conversion of the counter.
    const auto step = static_cast<uint64_t>(static_cast<int64_t>(step_value(step_counter, i)) + 1);
    a.rounding_stream = math::rounding_stream(static_cast<uint32_t>(*key.const_data_ptr<int64_t>()), step);
  }
  return a;
}

// Bias corrections for one step count, as the reference computes them from the float64
// step tensor; consecutive tensors usually share the step, so the last one is reused.
struct Corrections {
  double step = -1;
  double bc1 = 0, bc2_sqrt = 0, prev_bc1 = 0, prev_bc2_sqrt = 0;

  void update(double step_before, double beta1, double beta2) {
    if (step_before == step) {
      return;
    }
    step = step_before;
    const double t = step_before + 1;
    bc1 = 1 - std::pow(beta1, t);
    bc2_sqrt = std::sqrt(1 - std::pow(beta2, t));
    // At step 0 the moments are zero; clamping keeps the corrections finite (d_0 = 0).
    const double prev = step_before < 1 ? 1 : step_before;
    prev_bc1 = 1 - std::pow(beta1, prev);
    prev_bc2_sqrt = std::sqrt(1 - std::pow(beta2, prev));
  }
};

// Everything one multi-tensor call needs after validation.
struct Call {
  std::vector<int64_t> numels;
  Staging staging;
};

template <typename Args, typename Kernel>
void run(const WorkPlan& plan, const std::vector<Args>& args, Kernel kernel, double* slots, int width) {
  at::parallel_for(0, plan.num_tasks(), 1, [&](int64_t task_begin, int64_t task_end) {
    for (int64_t task = task_begin; task < task_end; ++task) {
      for (int64_t s = plan.task_offsets[task]; s < plan.task_offsets[task + 1]; ++s) {
        const Segment& seg = plan.segments[s];
        kernel(args[seg.tensor], seg.begin, seg.end, slots + s * width);
      }
    }
  });
}

// Sums each tensor's segment slots in segment order into a [n, width] float32 tensor.
Tensor reduce_slots(const WorkPlan& plan, const std::vector<double>& slots, int64_t n, int width,
                    bool last_is_flag) {
  Tensor out = at::empty({n, width}, at::TensorOptions().dtype(at::kFloat));
  float* o = out.mutable_data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    for (int k = 0; k < width; ++k) {
      double acc = 0;
      for (int64_t s = plan.tensor_offsets[i]; s < plan.tensor_offsets[i + 1]; ++s) {
        const double v = slots[s * width + k];
        acc = (last_is_flag && k == width - 1) ? (acc != 0 || v != 0 ? 1.0 : 0.0) : acc + v;
      }
      o[i * width + k] = static_cast<float>(acc);
    }
  }
  return out;
}

const KernelTable& table() { return kernel_table(); }

// --- grad_stats --------------------------------------------------------------------------------

Tensor grad_stats_cpu(TensorList grads, const std::optional<Tensor>& grad_scale) {
  const int64_t n = static_cast<int64_t>(grads.size());
  if (n == 0) {
    return at::zeros({0, kGradStats}, at::TensorOptions().dtype(at::kFloat));
  }
  const Dtype d = check_params(grads);
  const bool has_scale = grad_scale.has_value();
  const double scale = has_scale ? scalar_value(*grad_scale, "grad_scale") : 1.0;
  Call call;
  std::vector<GradArgs> args(n);
  call.numels.resize(n);
  for (const auto i : c10::irange(n)) {
    const Tensor& g = grads[i];
    call.numels[i] = g.numel();
    if (g.numel() == 0) {
      continue;
    }
    // A reduction reads memory in any order: only dense storage is needed.
    const Tensor& work = call.staging.reference(g, /*mutated=*/false);
    args[i].grad = work.const_data_ptr();
    args[i].grad_scale = to_opmath(scale, d);
  }
  const WorkPlan plan = plan_work(call.numels.data(), n);
  std::vector<double> slots(plan.segments.size() * kGradStats);
  run(plan, args, table().grad_stats[static_cast<int>(d)][has_scale], slots.data(), kGradStats);
  return reduce_slots(plan, slots, n, kGradStats, /*last_is_flag=*/true);
}

// --- update_ and hypergrad_stats -----------------------------------------------------------------

// Builds the kernel arguments of every tensor (staging layouts as needed) and runs `mode`.
// Returns the [n, 3] statistics (undefined tensor for Mode::kUpdate).
Tensor adam_call(const Hyper& h, Dtype d, int variant, TensorList params, TensorList grads, TensorList steps,
                 const State& st, const double* alphas, double grad_scale, bool has_scale, double clip,
                 Mode mode) {
  const int64_t n = static_cast<int64_t>(params.size());
  const bool write = mode != Mode::kStatsOnly;
  Call call;
  call.numels.resize(n);
  std::vector<AdamArgs> args(n);
  const GradArgs common = grad_args(h, grad_scale, clip, d);
  Corrections corr;
  for (const auto i : c10::irange(n)) {
    const Tensor& p = params[i];
    call.numels[i] = p.numel();
    if (p.numel() == 0) {
      continue;
    }
    AdamArgs& a = args[i];
    const Tensor& ref = call.staging.reference(p, write);
    a.param = param_args(ref, steps[i], st, i, call.staging, write);
    a.grad = common;
    a.grad.grad = call.staging.stage(grads[i], ref, false).const_data_ptr();
    a.exp_avg = call.staging.stage(st.exp_avgs[i], ref, write).data_ptr();
    a.exp_avg_sq = call.staging.stage(st.exp_avg_sqs[i], ref, write).data_ptr();
    a.max_exp_avg_sq = h.amsgrad ? call.staging.stage(st.max_exp_avg_sqs[i], ref, write).data_ptr() : nullptr;

    corr.update(step_value(steps[i], i), h.beta1, h.beta2);
    const double alpha = alphas != nullptr ? alphas[i] : 0.0;
    const bool decoupled = h.weight_decay != 0 && h.decoupled_weight_decay;
    a.decay_factor = decoupled ? to_opmath(1 - alpha * h.weight_decay, d) : 1.0;
    a.lerp_weight = to_opmath(1 - h.beta1, d);
    a.beta2 = to_opmath(h.beta2, d);
    a.one_minus_beta2 = to_opmath(1 - h.beta2, d);
    a.eps = to_opmath(h.eps, d);
    a.bias_correction2_sqrt = to_opmath(corr.bc2_sqrt, d);
    a.neg_step_size = to_opmath(-alpha / corr.bc1, d);
    a.prev_direction_scale = to_opmath(corr.prev_bc2_sqrt / corr.prev_bc1, d);
    a.prev_direction_eps = to_opmath(h.eps * corr.prev_bc2_sqrt, d);
  }
  const WorkPlan plan = plan_work(call.numels.data(), n);
  std::vector<double> slots(mode == Mode::kUpdate ? 0 : plan.segments.size() * kHypergradStats);
  run(plan, args, table().adam[variant][has_scale][h.amsgrad][static_cast<int>(mode)], slots.data(),
      kHypergradStats);
  call.staging.finish();
  return mode == Mode::kUpdate ? Tensor() : reduce_slots(plan, slots, n, kHypergradStats, false);
}

Tensor sgd_call(const Hyper& h, Dtype d, int variant, TensorList params, TensorList grads, TensorList steps,
                const State& st, const double* alphas, double grad_scale, bool has_scale, double clip,
                Mode mode) {
  const int64_t n = static_cast<int64_t>(params.size());
  const bool write = mode != Mode::kStatsOnly;
  const bool momentum = h.momentum != 0;
  const bool store_prev = h.needs_prev_direction;
  // What the kernel reads as the momentum buffer: the buffer itself, or (statistics only,
  // heavy-ball momentum) the source of d_{t-1}.
  const bool read_buffer = write ? momentum : !store_prev;
  Call call;
  call.numels.resize(n);
  std::vector<SgdArgs> args(n);
  const GradArgs common = grad_args(h, grad_scale, clip, d);
  for (const auto i : c10::irange(n)) {
    const Tensor& p = params[i];
    call.numels[i] = p.numel();
    if (p.numel() == 0) {
      continue;
    }
    SgdArgs& a = args[i];
    const Tensor& ref = call.staging.reference(p, write);
    a.param = param_args(ref, steps[i], st, i, call.staging, write);
    a.grad = common;
    a.grad.grad = call.staging.stage(grads[i], ref, false).const_data_ptr();
    a.momentum_buffer =
        read_buffer ? call.staging.stage(st.momentum_buffers[i], ref, write && momentum).data_ptr() : nullptr;
    a.prev_direction = store_prev ? call.staging.stage(st.prev_directions[i], ref, write).data_ptr() : nullptr;
    a.momentum = to_opmath(h.momentum, d);
    // torch.where(first_step, 1.0, 1.0 - dampening) is a float32 tensor in the reference.
    const bool first_step = step_value(steps[i], i) == 0;
    a.damp_weight = (h.dampening == 0 || first_step)
                        ? 1.0
                        : to_opmath(static_cast<double>(static_cast<float>(1.0 - h.dampening)), d);
    a.nesterov = h.nesterov;
    a.neg_lr = to_opmath(alphas != nullptr ? -alphas[i] : 0.0, d);
  }
  const WorkPlan plan = plan_work(call.numels.data(), n);
  std::vector<double> slots(mode == Mode::kUpdate ? 0 : plan.segments.size() * kHypergradStats);
  run(plan, args, table().sgd[variant][has_scale][momentum][store_prev][static_cast<int>(mode)],
      slots.data(), kHypergradStats);
  call.staging.finish();
  return mode == Mode::kUpdate ? Tensor() : reduce_slots(plan, slots, n, kHypergradStats, false);
}

// The statistics-only implementation behind the typed *_hypergrad_stats ops (op_inputs.h).
Tensor hypergrad_stats(const Hyper& h, TensorList params, TensorList grads, TensorList steps,
                                const State& st, const std::optional<Tensor>& grad_scale,
                                const std::optional<Tensor>& clip_coef) {
  if (params.empty()) {
    return at::zeros({0, kHypergradStats}, at::TensorOptions().dtype(at::kFloat));
  }
  const Dtype d = check_params(params);
  const at::ScalarType state_dtype = check_state(h, params, grads, steps, st, /*need_stats_source=*/true);
  const int variant = variant_of(params[0].scalar_type(), state_dtype, st);
  const bool has_scale = grad_scale.has_value();
  const double scale = has_scale ? scalar_value(*grad_scale, "grad_scale") : 1.0;
  const double clip = clip_coef.has_value() ? scalar_value(*clip_coef, "clip_coef") : 1.0;
  auto call = h.adam ? adam_call : sgd_call;
  return call(h, d, variant, params, grads, steps, st, nullptr, scale, has_scale, clip, Mode::kStatsOnly);
}

// The implementation behind the typed *_update_ ops (op_inputs.h).
Tensor update(const Hyper& h, TensorList params, TensorList grads, TensorList steps, const State& st,
                       const Tensor& alphas, const std::optional<Tensor>& grad_scale,
                       const std::optional<Tensor>& clip_coef, const std::optional<Tensor>& skip,
                       bool collect_stats) {
  const auto stats_options = at::TensorOptions().dtype(at::kFloat);
  const int64_t n = static_cast<int64_t>(params.size());
  if (n == 0) {
    return at::zeros({0, kHypergradStats}, stats_options);
  }
  const Dtype d = check_params(params);
  const at::ScalarType state_dtype = check_state(h, params, grads, steps, st, collect_stats);
  const int variant = variant_of(params[0].scalar_type(), state_dtype, st);
  TORCH_CHECK(alphas.device().is_cpu() && alphas.numel() == n, "alr: alphas must be a CPU tensor of ", n,
              " elements, got ", alphas.numel(), " on ", alphas.device());
  const Tensor alphas64 = alphas.to(at::kDouble).contiguous();
  const bool has_scale = grad_scale.has_value();
  const double scale = has_scale ? scalar_value(*grad_scale, "grad_scale") : 1.0;
  const double clip = clip_coef.has_value() ? scalar_value(*clip_coef, "clip_coef") : 1.0;
  if (skip.has_value() && scalar_value(*skip, "skip") != 0) {
    // Nothing is written; the statistics of a skipped step are never used.
    return collect_stats ? at::zeros({n, kHypergradStats}, stats_options)
                         : at::empty({0, kHypergradStats}, stats_options);
  }
  const Mode mode = collect_stats ? Mode::kUpdateStats : Mode::kUpdate;
  auto call = h.adam ? adam_call : sgd_call;
  Tensor stats =
      call(h, d, variant, params, grads, steps, st, alphas64.const_data_ptr<double>(), scale, has_scale, clip, mode);
  increment_steps(steps);
  return collect_stats ? stats : at::empty({0, kHypergradStats}, stats_options);
}

// Drops `values` (the op's arguments) holding the GIL once, when called from Python.
//
// A tensor created in Python has one C++ reference, its PyObject's; an argument list adds
// a second, and dropping that one decrefs the PyObject, which needs the GIL. torch's
// Python binding releases the GIL around the op call, so letting the argument lists die
// inside the op would take and release the GIL once per tensor: about 60 ns each, 0.3 ms
// for a bucket of 1,000 AdamW parameters (5,000 tensors). Taking it once costs the same as
// taking it for one tensor. Only a thread that already has a Python thread state (that
// is, one that came from Python and released the GIL) takes it; others drop the values
// as they are, and torch takes the GIL where a tensor needs it, as it always would.
void release_arguments(std::vector<c10::IValue>& values) {
  if (!values.empty() && Py_IsInitialized() != 0 && PyGILState_GetThisThreadState() != nullptr) {
    pybind11::gil_scoped_acquire gil;
    values.clear();
  }
  values.clear();
}

// Autograd: the ops are not differentiable. This kernel runs them below autograd and bumps
// the version counters of the tensors they mutate (as torch's in-place ops do), so that a
// graph which saved a parameter before the step notices the change.
void not_differentiable(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto& arguments = op.schema().arguments();
  const size_t first = stack->size() - arguments.size();
  // Copies of the arguments share their lists (no per-tensor reference counting) and keep
  // them alive after the kernel has popped them from the stack (see release_arguments).
  std::vector<c10::IValue> held((*stack).begin() + first, (*stack).end());
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const auto a : c10::irange(arguments.size())) {
    const auto* alias = arguments[a].alias_info();
    if (alias == nullptr || !alias->isWrite()) {
      continue;
    }
    const c10::IValue& value = held[a];
    if (value.isTensorList()) {
      for (const c10::IValue& t : value.toListRef()) {
        torch::autograd::impl::bump_version(t.toTensor());
      }
    } else if (value.isTensor()) {
      torch::autograd::impl::bump_version(value.toTensor());
    }
  }
  release_arguments(held);
}

std::string cpu_isa(c10::string_view requested) {
  if (!requested.empty()) {
    const std::string name(requested);
    Isa isa;
    TORCH_CHECK(parse_isa(name.c_str(), &isa), "alr: unknown instruction set '", name,
                "' (expected 'default', 'avx2' or 'avx512')");
    TORCH_CHECK(set_active_isa(isa), "alr: this CPU or build cannot run the '", name, "' kernels");
  }
  return isa_name(active_isa());
}

}  // namespace

TORCH_LIBRARY_IMPL(alr, CPU, m) {
  using Ops = ops::TypedOps<&hypergrad_stats, &update>;
  m.impl("grad_stats", &grad_stats_cpu);
  m.impl("adam_hypergrad_stats", &Ops::adam_hypergrad_stats);
  m.impl("sgd_hypergrad_stats", &Ops::sgd_hypergrad_stats);
  m.impl("adam_update_", &Ops::adam_update_);
  m.impl("sgd_update_", &Ops::sgd_update_);
}

TORCH_LIBRARY_IMPL(alr, Autograd, m) {
  m.impl("grad_stats", torch::CppFunction::makeFromBoxedFunction<&not_differentiable>());
  for (const char* name : ops::kStepOps) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&not_differentiable>());
  }
}

TORCH_LIBRARY_IMPL(alr, CompositeExplicitAutograd, m) { m.impl("_cpu_isa", &cpu_isa); }

}  // namespace cpu
}  // namespace alr
