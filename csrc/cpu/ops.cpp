// CPU implementations of the alr ops (schemas in csrc/registration.cpp).
//
// One call handles one bucket: every tensor of one (device, dtype) of a param group. The
// host side of the op reads the per-tensor scalars (step counters, effective learning
// rates, the GradScaler scale, the clip coefficient, the skip flag) from their CPU tensors
// (no synchronisation: they are CPU tensors), computes the algorithm's per-tensor scalars
// with csrc/step_scalars.h (in double, exactly like alr/reference.py), and builds one
// argument record per tensor. The elements of all tensors are then cut into segments
// (multi_tensor.h) that at::parallel_for runs across torch's intra-op threads; each segment
// writes its partial statistics to its own slot, and the slots are summed per tensor in
// segment order (deterministic for any number of threads).
//
// One driver (run_step) does this for every algorithm: an algorithm brings its kernel and
// a builder of its per-tensor argument record (AdamTensors, SgdTensors), which stages its
// state tensors and fills in its scalars.
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
#include "step_scalars.h"

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


GradArgs grad_args(const Hyper& h, double grad_scale, bool has_scale, double clip, Dtype d) {
  GradArgs g{};
  g.has_scale = has_scale;
  g.grad_scale = to_opmath(grad_scale, d);
  // -(g·c) == g·(-c) exactly, and g·1 == g: maximize and clipping fold into one factor.
  g.grad_mult = to_opmath(clip, d) * (h.maximize ? -1.0 : 1.0);
  g.coupled_decay = h.weight_decay != 0 && !(h.algorithm == Algorithm::kAdam && h.decoupled_weight_decay);
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
// The [n, width] per-tensor sums of the segments' slots, in `dtype` (float32, or float64
// for the gradient statistics of float64 gradients).
Tensor reduce_slots(const WorkPlan& plan, const std::vector<double>& slots, int64_t n, int width, bool last_is_flag,
                    at::ScalarType dtype = at::kFloat) {
  Tensor sums = at::empty({n, width}, at::TensorOptions().dtype(at::kDouble));
  double* o = sums.mutable_data_ptr<double>();
  for (int64_t i = 0; i < n; ++i) {
    for (int k = 0; k < width; ++k) {
      double acc = 0;
      for (int64_t s = plan.tensor_offsets[i]; s < plan.tensor_offsets[i + 1]; ++s) {
        const double v = slots[s * width + k];
        acc = (last_is_flag && k == width - 1) ? (acc != 0 || v != 0 ? 1.0 : 0.0) : acc + v;
      }
      o[i * width + k] = acc;
    }
  }
  return dtype == at::kDouble ? sums : sums.to(dtype);
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
  Staging staging;
  std::vector<int64_t> numels(n);
  std::vector<GradArgs> args(n);
  for (const auto i : c10::irange(n)) {
    const Tensor& g = grads[i];
    numels[i] = g.numel();
    if (g.numel() == 0) {
      continue;
    }
    // A reduction reads memory in any order: only dense storage is needed.
    const Tensor& work = staging.reference(g, /*mutated=*/false);
    args[i].grad = work.const_data_ptr();
    args[i].has_scale = has_scale;
    args[i].grad_scale = to_opmath(scale, d);
  }
  const WorkPlan plan = plan_work(numels.data(), n);
  std::vector<double> slots(plan.segments.size() * kGradStats);
  run(plan, args, table().grad_stats[static_cast<int>(d)], slots.data(), kGradStats);
  return reduce_slots(plan, slots, n, kGradStats, /*last_is_flag=*/true,
                      d == Dtype::kDouble ? at::kDouble : at::kFloat);
}

// --- update_ and hypergrad_stats: the step driver ------------------------------------------------

// The inputs of one step call of either algorithm, after validation.
struct StepInputs {
  const Hyper& h;
  Dtype dtype;
  int variant;
  TensorList params, grads, steps;
  const State& st;
  const double* alphas;  // float64 [n] effective learning rates; nullptr for Mode::kStatsOnly
  double grad_scale;     // 1 without a GradScaler
  bool has_scale;
  double clip;           // 1 without clipping
  Mode mode;
};

// Stages the tensors of one position to the layout of its parameter (Staging) and hands the
// kernels their data pointers.
class TensorStager {
 public:
  TensorStager(Staging& staging, const Tensor& ref, bool write) : staging_(staging), ref_(ref), write_(write) {}
  // The data pointer of `t` in ref's layout; copied back after the call if the step writes
  // it (mutated) and writes at all (not Mode::kStatsOnly).
  void* operator()(const Tensor& t, bool mutated) const {
    return staging_.stage(t, ref_, write_ && mutated).data_ptr();
  }

 private:
  Staging& staging_;
  const Tensor& ref_;
  bool write_;
};

// The one driver of every algorithm: builds the argument record of each non-empty tensor
// (the parameter, the gradient and GradArgs here; the algorithm's state and scalars by
// `tensors.fill(args, i, stage, step_before, alpha)`), runs `kernel` over the segments of
// all tensors, copies staged tensors back and returns the [n, 3] statistics (an undefined
// tensor for Mode::kUpdate).
template <typename Args, typename Tensors>
Tensor run_step(const StepInputs& in, void (*kernel)(const Args&, int64_t, int64_t, double*), Tensors& tensors) {
  const int64_t n = static_cast<int64_t>(in.params.size());
  const bool write = in.mode != Mode::kStatsOnly;
  Staging staging;
  std::vector<int64_t> numels(n);
  std::vector<Args> args(n);
  const GradArgs common = grad_args(in.h, in.grad_scale, in.has_scale, in.clip, in.dtype);
  for (const auto i : c10::irange(n)) {
    const Tensor& p = in.params[i];
    numels[i] = p.numel();
    if (p.numel() == 0) {
      continue;
    }
    Args& a = args[i];
    const Tensor& ref = staging.reference(p, write);
    a.mode = in.mode;
    a.param = param_args(ref, in.steps[i], in.st, i, staging, write);
    a.grad = common;
    a.grad.grad = staging.stage(in.grads[i], ref, false).const_data_ptr();
    const double alpha = in.alphas != nullptr ? in.alphas[i] : 0.0;
    tensors.fill(a, i, TensorStager(staging, ref, write), step_value(in.steps[i], i), alpha);
  }
  const WorkPlan plan = plan_work(numels.data(), n);
  std::vector<double> slots(in.mode == Mode::kUpdate ? 0 : plan.segments.size() * kHypergradStats);
  run(plan, args, kernel, slots.data(), kHypergradStats);
  staging.finish();
  return in.mode == Mode::kUpdate ? Tensor() : reduce_slots(plan, slots, n, kHypergradStats, false);
}

// Adam's per-tensor state and scalars (step_scalars.h), rounded to opmath.
class AdamTensors {
 public:
  explicit AdamTensors(const StepInputs& in) : in_(in) {}

  void fill(AdamArgs& a, int64_t i, const TensorStager& stage, double step_before, double alpha) {
    const Hyper& h = in_.h;
    a.amsgrad = h.amsgrad;
    const State& st = in_.st;
    a.exp_avg = stage(st[adam_stream::kExpAvg][i], true);
    a.exp_avg_sq = stage(st[adam_stream::kExpAvgSq][i], true);
    a.max_exp_avg_sq = h.amsgrad ? stage(st[adam_stream::kMaxExpAvgSq][i], true) : a.exp_avg_sq;
    const scalars::AdamTensorScalars s = scalars::adam_tensor_scalars(
        corrections(step_before), alpha, h.eps, h.weight_decay, h.weight_decay != 0 && h.decoupled_weight_decay);
    a.decay_factor = opmath(s.decay_factor);
    a.lerp_weight = opmath(1 - h.beta1);
    a.beta2 = opmath(h.beta2);
    a.one_minus_beta2 = opmath(1 - h.beta2);
    a.eps = opmath(h.eps);
    a.bias_correction2_sqrt = opmath(s.bias_correction2_sqrt);
    a.neg_step_size = opmath(s.neg_step_size);
    a.prev_direction_scale = opmath(s.prev_direction_scale);
    a.prev_direction_eps = opmath(s.prev_direction_eps);
  }

 private:
  double opmath(double x) const { return to_opmath(x, in_.dtype); }

  // Consecutive tensors usually share the step count: the last corrections are reused.
  const scalars::AdamCorrections& corrections(double step_before) {
    if (step_before != cached_step_) {
      cached_step_ = step_before;
      cached_ = scalars::adam_corrections(in_.h.beta1, in_.h.beta2, step_before);
    }
    return cached_;
  }

  const StepInputs& in_;
  double cached_step_ = -1;
  scalars::AdamCorrections cached_{};
};

// SGD's per-tensor state and scalars (step_scalars.h), rounded to opmath.
class SgdTensors {
 public:
  explicit SgdTensors(const StepInputs& in) : in_(in) {}

  void fill(SgdArgs& a, int64_t i, const TensorStager& stage, double step_before, double alpha) const {
    const Hyper& h = in_.h;
    const bool write = in_.mode != Mode::kStatsOnly;
    a.momentum_enabled = h.momentum != 0;
    a.store_prev = h.needs_prev_direction;
    // Read-only statistics without a stored previous direction take d_{t-1} from the buffer.
    const bool read_buffer = write ? a.momentum_enabled : !a.store_prev;
    const State& st = in_.st;
    a.momentum_buffer = read_buffer ? stage(st[sgd_stream::kMomentumBuffer][i], a.momentum_enabled) : nullptr;
    a.prev_direction = a.store_prev ? stage(st[sgd_stream::kPrevDirection][i], true) : nullptr;
    const scalars::SgdTensorScalars s = scalars::sgd_tensor_scalars(h.dampening, step_before, alpha);
    a.momentum = opmath(h.momentum);
    a.damp_weight = opmath(s.damp_weight);
    a.nesterov = h.nesterov;
    a.neg_lr = opmath(s.neg_lr);
  }

 private:
  double opmath(double x) const { return to_opmath(x, in_.dtype); }

  const StepInputs& in_;
};

Tensor step_call(const StepInputs& in) {
  if (in.h.algorithm == Algorithm::kAdam) {
    AdamTensors tensors(in);
    return run_step(in, table().adam[in.variant], tensors);
  }
  SgdTensors tensors(in);
  return run_step(in, table().sgd[in.variant], tensors);
}

// The statistics-only implementation behind the typed *_hypergrad_stats ops (op_inputs.h).
Tensor hypergrad_stats(const Hyper& h, TensorList params, TensorList grads, TensorList steps, const State& st,
                       const std::optional<Tensor>& grad_scale, const std::optional<Tensor>& clip_coef) {
  if (params.empty()) {
    return at::zeros({0, kHypergradStats}, at::TensorOptions().dtype(at::kFloat));
  }
  const Dtype d = check_params(params);
  const at::ScalarType state_dtype = check_state(h, params, grads, steps, st, /*need_stats_source=*/true);
  const int variant = variant_of(params[0].scalar_type(), state_dtype, st);
  const bool has_scale = grad_scale.has_value();
  const double scale = has_scale ? scalar_value(*grad_scale, "grad_scale") : 1.0;
  const double clip = clip_coef.has_value() ? scalar_value(*clip_coef, "clip_coef") : 1.0;
  return step_call(StepInputs{h, d, variant, params, grads, steps, st, nullptr, scale, has_scale, clip,
                              Mode::kStatsOnly});
}

// The implementation behind the typed *_update_ ops (op_inputs.h).
Tensor update(const Hyper& h, TensorList params, TensorList grads, TensorList steps, const State& st,
              const Tensor& alphas, const std::optional<Tensor>& grad_scale, const std::optional<Tensor>& clip_coef,
              const std::optional<Tensor>& skip, bool collect_stats) {
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
  Tensor stats = step_call(StepInputs{h, d, variant, params, grads, steps, st, alphas64.const_data_ptr<double>(),
                                      scale, has_scale, clip, mode});
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
  for (const std::string& name : ops::step_op_names()) {
    m.impl(name.c_str(), torch::CppFunction::makeFromBoxedFunction<&not_differentiable>());
  }
}

TORCH_LIBRARY_IMPL(alr, CompositeExplicitAutograd, m) { m.impl("_cpu_isa", &cpu_isa); }

}  // namespace cpu
}  // namespace alr
