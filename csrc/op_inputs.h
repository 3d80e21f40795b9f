// The input layer shared by the CPU and CUDA implementations of the alr ops: the ops'
// hyper-parameters, the checks of their tensor lists, and the staging of tensors whose
// layout differs from their parameter's. Host code only; torch types.
#pragma once

#include <array>
#include <deque>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_strided.h>
#include <c10/util/irange.h>

#include "algorithms.h"

namespace alr {
namespace ops {

using at::Tensor;
using at::TensorList;

// Same memory order for every element: equal sizes, and equal strides wherever a
// dimension has more than one element.
inline bool same_layout(const Tensor& a, const Tensor& b) {
  const auto* ia = a.unsafeGetTensorImpl();
  const auto* ib = b.unsafeGetTensorImpl();
  if (ia->sizes() != ib->sizes()) {
    return false;
  }
  if (ia->is_contiguous() && ib->is_contiguous()) {
    return true;
  }
  const auto sa = ia->strides();
  const auto sb = ib->strides();
  const auto sizes = ia->sizes();
  for (const auto d : c10::irange(sizes.size())) {
    if (sizes[d] != 1 && sa[d] != sb[d]) {
      return false;
    }
  }
  return true;
}

// The tensors of one position (param, grad, state) as the kernels see them, with the
// temporaries of the layout fallback (copies on the tensors' device, and on CUDA on the
// current stream).
class Staging {
 public:
  // `t` itself when it has the layout of `ref` (which is dense), else a temporary copy in
  // that layout; `mutated` ones are copied back by finish().
  const Tensor& stage(const Tensor& t, const Tensor& ref, bool mutated) {
    if (same_layout(t, ref)) {
      return t;
    }
    Tensor tmp = at::empty_strided(ref.sizes(), ref.strides(), t.options());
    tmp.copy_(t);
    return keep(t, std::move(tmp), mutated);
  }

  // The layout reference for a position: the parameter when it is dense, else a
  // contiguous copy of it (copied back if mutated).
  const Tensor& reference(const Tensor& param, bool mutated) {
    if (param.is_non_overlapping_and_dense()) {
      return param;
    }
    return keep(param, param.contiguous(), mutated);
  }

  void finish() {
    for (auto& [dst, src] : copy_back_) {
      dst.copy_(src);
    }
  }

 private:
  const Tensor& keep(const Tensor& original, Tensor tmp, bool mutated) {
    staged_.push_back(std::move(tmp));
    if (mutated) {
      copy_back_.emplace_back(original, staged_.back());
    }
    return staged_.back();
  }

  // std::vector would move its elements on growth and invalidate returned references.
  std::deque<Tensor> staged_;
  std::vector<std::pair<Tensor, Tensor>> copy_back_;
};

inline void check_list(TensorList list, size_t n, const char* name) {
  TORCH_CHECK(list.size() == n, "alr: expected ", n, " tensors in ", name, ", got ", list.size());
  for (const auto i : c10::irange(n)) {
    TORCH_CHECK(list[i].defined(), "alr: ", name, "[", i, "] is undefined");
  }
}

// The hyper-parameters the ops take as keyword arguments, and the options that decide which
// state streams exist.
struct Hyper {
  Algorithm algorithm;
  double beta1, beta2, eps, weight_decay;
  bool decoupled_weight_decay, amsgrad, maximize;
  double momentum, dampening;
  bool nesterov, needs_prev_direction;
};

inline void check_hyper_count(Algorithm a, c10::ArrayRef<double> hyper) {
  const AlgorithmDecl& d = declaration(a);
  if (static_cast<int>(hyper.size()) == d.num_hyper) {
    return;
  }
  std::string names;
  for (int k = 0; k < d.num_hyper; ++k) {
    names += (k > 0 ? ", " : "") + std::string(d.hyper[k]);
  }
  TORCH_CHECK(false, "alr: the ", d.name, " ops take hyper = [", names, "], got ", hyper.size(), " values");
}

// The `float[] hyper` of the typed ops, in the order of the declarations (algorithms.h). The
// options that decide which state exists come from the lists: amsgrad from max_exp_avg_sq,
// SGD's stored d_{t-1} from hypergrad_prev_direction.
inline Hyper adam_hyper(c10::ArrayRef<double> hyper, bool decoupled_weight_decay, bool amsgrad, bool maximize) {
  check_hyper_count(Algorithm::kAdam, hyper);
  return Hyper{Algorithm::kAdam, hyper[0], hyper[1], hyper[2], hyper[3], decoupled_weight_decay, amsgrad,
               maximize,         0.0,      0.0,      false,    false};
}

inline Hyper sgd_hyper(c10::ArrayRef<double> hyper, bool nesterov, bool maximize, bool store_prev) {
  check_hyper_count(Algorithm::kSgd, hyper);
  return Hyper{Algorithm::kSgd, 0.0, 0.0, 0.0, hyper[2], false, false, maximize, hyper[0], hyper[1], nesterov,
               store_prev};
}

// Whether the options of `h` keep state stream `k` (algorithms.h); the lists of the others are
// empty. alr/algorithms.py's StateStream.needed, for the options the ops see.
inline bool keeps_stream(const Hyper& h, int k) {
  switch (h.algorithm) {
    case Algorithm::kAdam:
      return k != adam_stream::kMaxExpAvgSq || h.amsgrad;
    case Algorithm::kSgd:
      return k == sgd_stream::kMomentumBuffer ? h.momentum != 0 : h.needs_prev_direction;
  }
  return false;
}

// Whether a call of mode `write` (update) or not (statistics only) reads stream `k`: the
// streams kept, and for SGD's read-only statistics without a stored previous direction the
// momentum buffer, which then holds d_{t-1}.
inline bool reads_stream(const Hyper& h, int k, bool write) {
  if (h.algorithm == Algorithm::kSgd && k == sgd_stream::kMomentumBuffer && !write) {
    return !h.needs_prev_direction;
  }
  return keeps_stream(h, k);
}

// The tensor lists of one call: the algorithm's state streams in declaration order (a stream
// the options do not keep is an empty list), the float32 copies of 16-bit parameters (or
// empty) and the 0-d int64 stochastic-rounding keys of bfloat16 parameters (or empty).
struct State {
  std::array<TensorList, kMaxStreams> streams;
  TensorList master_params;
  TensorList rounding_keys;

  const TensorList& operator[](int k) const { return streams[k]; }
};

inline bool is_16_bit(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

// Same device and shape as its parameter, and dtype `dtype`.
inline void check_matches(const Tensor& t, const Tensor& param, at::ScalarType dtype, const char* name,
                          size_t i) {
  TORCH_CHECK(t.device() == param.device(), "alr: ", name, "[", i, "] is on ", t.device(),
              " but its parameter is on ", param.device());
  TORCH_CHECK(t.scalar_type() == dtype, "alr: ", name, "[", i, "] has dtype ", t.scalar_type(), " but ",
              dtype, " was expected");
  TORCH_CHECK(t.sizes() == param.sizes(), "alr: ", name, "[", i, "] has shape ", t.sizes(),
              " but its parameter has ", param.sizes());
}

// Checks every list against the parameters (of dtype `param_dtype`, one per bucket) and
// returns the dtype of the state tensors: one for all of them, the parameters' own, float32
// or bfloat16 (the parameters' when the algorithm keeps no state).
inline at::ScalarType check_state(const Hyper& h, TensorList params, TensorList grads, TensorList steps,
                                  const State& s, bool need_stats_source) {
  const size_t n = params.size();
  const at::ScalarType param_dtype = params[0].scalar_type();
  check_list(grads, n, "grads");
  check_list(steps, n, "steps");
  std::vector<std::pair<TensorList, const char*>> lists;
  const AlgorithmDecl& decl = declaration(h.algorithm);
  for (int k = 0; k < decl.num_streams; ++k) {
    if (keeps_stream(h, k)) {
      lists.emplace_back(s[k], decl.streams[k]);
    }
  }
  TORCH_CHECK(!need_stats_source || h.algorithm != Algorithm::kSgd || !lists.empty(),
              "alr: SGD hypergradient statistics need momentum_buffer (momentum != 0) or "
              "hypergrad_prev_direction");
  for (const auto& [list, name] : lists) {
    check_list(list, n, name);
  }
  // Without state the variant's state dtype is nominal: the parameters', or with master
  // copies float32 (16-bit parameters with masters have no variant with 16-bit state).
  const at::ScalarType stateless_dtype = s.master_params.empty() ? param_dtype : at::kFloat;
  const at::ScalarType state_dtype = lists.empty() ? stateless_dtype : lists[0].first[0].scalar_type();
  TORCH_CHECK(state_dtype == param_dtype || state_dtype == at::kFloat || state_dtype == at::kBFloat16,
              "alr: state tensors must have the parameters' dtype (", param_dtype, "), float32 or bfloat16, got ",
              state_dtype);
  const bool master = !s.master_params.empty();
  const bool stochastic = !s.rounding_keys.empty();
  if (master) {
    check_list(s.master_params, n, "master_params");
    TORCH_CHECK(is_16_bit(param_dtype), "alr: master_params are kept for bfloat16 and float16 parameters, not ",
                param_dtype);
  }
  if (stochastic) {
    check_list(s.rounding_keys, n, "rounding_keys");
    TORCH_CHECK(param_dtype == at::kBFloat16 && !master,
                "alr: rounding_keys round bfloat16 parameters without master_params (parameters are ", param_dtype,
                master ? ", with master_params)" : ")");
  }
  for (const auto i : c10::irange(n)) {
    check_matches(grads[i], params[i], param_dtype, "grads", i);
    for (const auto& [list, name] : lists) {
      check_matches(list[i], params[i], state_dtype, name, i);
    }
    if (master) {
      check_matches(s.master_params[i], params[i], at::kFloat, "master_params", i);
    }
    if (stochastic) {
      const Tensor& key = s.rounding_keys[i];
      TORCH_CHECK(key.device() == params[i].device() && key.numel() == 1 && key.scalar_type() == at::kLong,
                  "alr: rounding_keys[", i, "] must be a one-element int64 tensor on ", params[i].device());
    }
  }
  return state_dtype;
}

// A device's implementation of the statistics-only pass and of the update.
using HypergradStatsFn = Tensor (*)(const Hyper& h, TensorList params, TensorList grads, TensorList steps,
                                    const State& st, const std::optional<Tensor>& grad_scale,
                                    const std::optional<Tensor>& clip_coef);
using UpdateFn = Tensor (*)(const Hyper& h, TensorList params, TensorList grads, TensorList steps, const State& st,
                            const Tensor& alphas, const std::optional<Tensor>& grad_scale,
                            const std::optional<Tensor>& clip_coef, const std::optional<Tensor>& skip,
                            bool collect_stats);

// The typed ops of csrc/registration.cpp on a device's two implementations: each device
// registers &TypedOps<its functions>::adam_update_ etc., so the mapping from an algorithm's
// op arguments to (Hyper, State) exists once.
template <HypergradStatsFn kHypergradStats, UpdateFn kUpdate>
struct TypedOps {
  using OptionalTensor = std::optional<Tensor>;

  static Tensor adam_hypergrad_stats(TensorList params, TensorList grads, TensorList steps, TensorList exp_avg,
                                     TensorList exp_avg_sq, TensorList max_exp_avg_sq, TensorList master_param,
                                     const OptionalTensor& grad_scale, const OptionalTensor& clip_coef,
                                     c10::ArrayRef<double> hyper, bool decoupled_weight_decay, bool maximize) {
    const Hyper h = adam_hyper(hyper, decoupled_weight_decay, !max_exp_avg_sq.empty(), maximize);
    const State st{{exp_avg, exp_avg_sq, max_exp_avg_sq}, master_param, {}};
    return kHypergradStats(h, params, grads, steps, st, grad_scale, clip_coef);
  }

  static Tensor sgd_hypergrad_stats(TensorList params, TensorList grads, TensorList steps, TensorList momentum_buffer,
                                    TensorList prev_direction, TensorList master_param,
                                    const OptionalTensor& grad_scale, const OptionalTensor& clip_coef,
                                    c10::ArrayRef<double> hyper, bool nesterov, bool maximize) {
    const Hyper h = sgd_hyper(hyper, nesterov, maximize, !prev_direction.empty());
    const State st{{momentum_buffer, prev_direction}, master_param, {}};
    return kHypergradStats(h, params, grads, steps, st, grad_scale, clip_coef);
  }

  static Tensor adam_update_(TensorList params, TensorList grads, TensorList steps, TensorList exp_avg,
                             TensorList exp_avg_sq, TensorList max_exp_avg_sq, TensorList master_param,
                             TensorList rounding_key, const Tensor& alphas, const OptionalTensor& grad_scale,
                             const OptionalTensor& clip_coef, const OptionalTensor& skip, c10::ArrayRef<double> hyper,
                             bool decoupled_weight_decay, bool maximize, bool collect_stats) {
    const Hyper h = adam_hyper(hyper, decoupled_weight_decay, !max_exp_avg_sq.empty(), maximize);
    const State st{{exp_avg, exp_avg_sq, max_exp_avg_sq}, master_param, rounding_key};
    return kUpdate(h, params, grads, steps, st, alphas, grad_scale, clip_coef, skip, collect_stats);
  }

  static Tensor sgd_update_(TensorList params, TensorList grads, TensorList steps, TensorList momentum_buffer,
                            TensorList prev_direction, TensorList master_param, TensorList rounding_key,
                            const Tensor& alphas, const OptionalTensor& grad_scale, const OptionalTensor& clip_coef,
                            const OptionalTensor& skip, c10::ArrayRef<double> hyper, bool nesterov, bool maximize,
                            bool collect_stats) {
    const Hyper h = sgd_hyper(hyper, nesterov, maximize, !prev_direction.empty());
    const State st{{momentum_buffer, prev_direction}, master_param, rounding_key};
    return kUpdate(h, params, grads, steps, st, alphas, grad_scale, clip_coef, skip, collect_stats);
  }
};

// The step ops' names (<algorithm>_hypergrad_stats, <algorithm>_update_), for the
// registrations that cover them all (Autograd, tests).
inline std::vector<std::string> step_op_names() {
  std::vector<std::string> names;
  for (const AlgorithmDecl& d : kAlgorithms) {
    names.push_back(std::string(d.name) + "_hypergrad_stats");
    names.push_back(std::string(d.name) + "_update_");
  }
  return names;
}

}  // namespace ops
}  // namespace alr
