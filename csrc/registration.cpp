// The alr operator namespace and the alr._C Python module.
//
// Op schemas are defined once, here; each device's kernels register against them
// with TORCH_LIBRARY_IMPL(alr, <Device>, m) in csrc/cpu/ and csrc/cuda/.
// build_info() reports what this module was compiled with and provides.

#include <algorithm>
#include <string>
#include <vector>

#include <ATen/core/dispatch/Dispatcher.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/library.h>
#include <torch/version.h>

#include "algorithms.h"

#ifndef ALR_VERSION
#error "ALR_VERSION must be defined by the build (setup.py or CMakeLists.txt)"
#endif

#define ALR_STRINGIFY_IMPL(x) #x
#define ALR_STRINGIFY(x) ALR_STRINGIFY_IMPL(x)

namespace {

// The schema of an algorithm's update (mutating) or statistics op, from its declaration:
// alr.op_args.op_schema writes the same (tests/test_declarations.py compares them).
std::string step_op_schema(const alr::AlgorithmDecl& algorithm, bool update) {
  std::vector<std::string> lists = {"params", "grads", "steps"};
  for (int k = 0; k < algorithm.num_streams; ++k) {
    lists.emplace_back(algorithm.streams[k]);
  }
  lists.emplace_back("master_param");
  if (update) {
    lists.emplace_back("rounding_key");
  }
  // An update writes the parameters, the step counters, the state and the master copies.
  const auto mutated = [&](const std::string& name) { return update && name != "grads" && name != "rounding_key"; };
  std::string schema = std::string(algorithm.name) + (update ? "_update_(" : "_hypergrad_stats(");
  char letter = 'a';
  for (const std::string& name : lists) {
    schema += mutated(name) ? std::string("Tensor(") + letter++ + "!)[] " : "Tensor[] ";
    schema += name + ", ";
  }
  schema += update ? "Tensor alphas, Tensor? grad_scale, Tensor? clip_coef, Tensor? skip, *, float[] hyper"
                   : "Tensor? grad_scale, Tensor? clip_coef, *, float[] hyper";
  for (const char* flag : algorithm.flags) {
    schema += std::string(", bool ") + flag;
  }
  return schema + (update ? ", bool collect_stats) -> Tensor" : ") -> Tensor");
}

}  // namespace

TORCH_LIBRARY(alr, m) {
  // Python code adding ops to this namespace must use torch.library.Library("alr",
  // "FRAGMENT"): a second "DEF" library for the namespace is an error. The semantics of
  // every op are those of the function of the same name in alr/reference.py, over one
  // bucket (the parameters of one param group on one device and dtype).
  //
  // The step ops are typed per algorithm, as ATen's _fused_adam_ / _fused_sgd_ are. Their
  // schemas are generated from the native declaration (algorithms.h), the mirror of
  // alr/algorithms.py (alr.op_args.op_schema generates the same strings, and
  // tests/test_declarations.py compares them): the tensor
  // lists params, grads, steps, then the algorithm's state streams in declaration order, the
  // float32 master copies of 16-bit parameters (or empty) and, for updates, the 0-d int64
  // stochastic-rounding keys (or empty); a stream the options do not keep is an empty list,
  // and that is how the ops learn amsgrad, momentum and the stored previous direction.
  // `hyper` holds the algorithm's float hyper-parameters in the declared order
  // (AlgorithmDecl::hyper). The state lists share one dtype: the
  // parameters', float32 or bfloat16 (state_dtype).

  // Per-tensor [n, 2] float32: squared L2 norm of grad / grad_scale, nonfinite flag (0/1).
  m.def("grad_stats(Tensor[] grads, Tensor? grad_scale) -> Tensor");

  // Per algorithm (algorithms.h), <name>_hypergrad_stats: per-tensor [n, 3] float32
  // hypergradient statistics g·d_prev, g·g, d_prev·d_prev of the state before any update (the
  // read-only pre-pass of hypergrad_exact); and <name>_update_: one step over the bucket, in
  // place: params, state and step counters (unless the 0-d bool `skip` is true: then nothing
  // is written). alphas: float64 [n] effective learning rates. Returns the [n, 3] statistics
  // of *_hypergrad_stats taken before the update when collect_stats, else an empty [0, 3]
  // tensor. With master_param, the master copies are updated and the parameters receive
  // their images rounded to nearest; with rounding_key (bfloat16 parameters without
  // masters), the parameters are rounded stochastically from the stream of (key, step,
  // element offset) of alr/reference.py.
  for (const alr::AlgorithmDecl& algorithm : alr::kAlgorithms) {
    m.def(step_op_schema(algorithm, /*update=*/false).c_str());
    m.def(step_op_schema(algorithm, /*update=*/true).c_str());
  }

  // Debugging and benchmarking: the instruction set of the CPU kernels ("default", "avx2",
  // "avx512"); a non-empty `requested` switches to it (an error if this CPU lacks it).
  m.def("_cpu_isa(str requested=\"\") -> str");
}

namespace {

namespace py = pybind11;

// Version of the torch headers this module was compiled against.
std::string torch_version() {
  return std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
         std::to_string(TORCH_VERSION_PATCH);
}

std::string cxx_compiler() {
#if defined(__clang__)
  return "clang " __clang_version__;
#elif defined(__GNUC__)
  return "gcc " __VERSION__;
#else
  return "unknown";
#endif
}

// Kernels in csrc/cpu register with TORCH_LIBRARY_IMPL(alr, CPU, m) when this module is
// loaded, so the dispatcher's CPU registrations in the alr namespace are exactly the CPU
// kernels that were compiled in.
std::vector<std::string> cpu_kernels() {
  std::vector<std::string> names;
  const auto registered =
      c10::Dispatcher::singleton().getRegistrationsForDispatchKey(c10::DispatchKey::CPU);
  for (const auto& op : registered) {
    if (op.name.rfind("alr::", 0) == 0) {
      names.push_back(op.overload_name.empty() ? op.name : op.name + "." + op.overload_name);
    }
  }
  std::sort(names.begin(), names.end());
  return names;
}

py::dict build_info() {
  py::dict info;
  info["version"] = ALR_STRINGIFY(ALR_VERSION);
  info["torch_version"] = torch_version();
  info["cxx_compiler"] = cxx_compiler();
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["cpu_kernels"] = cpu_kernels();
  // CUDA kernels are built into the separate alr._C_cuda module, never into this one.
  info["cuda"] = false;
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "alr CPU extension: the alr op namespace and its CPU kernels.";
  m.def("build_info", &build_info,
        "What this module was compiled with: versions, compiler, OpenMP and CPU kernels.");
}
