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

#ifndef ALR_VERSION
#error "ALR_VERSION must be defined by the build (setup.py or CMakeLists.txt)"
#endif

#define ALR_STRINGIFY_IMPL(x) #x
#define ALR_STRINGIFY(x) ALR_STRINGIFY_IMPL(x)

TORCH_LIBRARY(alr, m) {
  // The fused op schemas (m.def("fused_step_(...) -> ()")) live here. Python code
  // adding ops to this namespace must use torch.library.Library("alr", "FRAGMENT"):
  // a second "DEF" library for the namespace is an error.
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
