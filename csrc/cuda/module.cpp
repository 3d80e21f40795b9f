// The alr._C_cuda Python module: loading it registers the CUDA kernels of the alr ops
// (ops.cpp) with the dispatcher. alr._C, loaded first by alr._extension, defines the ops.
//
// Importing this module needs the CUDA runtime libraries that torch ships, never a GPU.
#include <algorithm>
#include <string>
#include <vector>

#include <ATen/core/dispatch/Dispatcher.h>
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

namespace {

namespace py = pybind11;

// The alr ops with a kernel registered under the CUDA dispatch key.
std::vector<std::string> cuda_kernels() {
  std::vector<std::string> names;
  const auto registered = c10::Dispatcher::singleton().getRegistrationsForDispatchKey(c10::DispatchKey::CUDA);
  for (const auto& op : registered) {
    if (op.name.rfind("alr::", 0) == 0) {
      names.push_back(op.overload_name.empty() ? op.name : op.name + "." + op.overload_name);
    }
  }
  std::sort(names.begin(), names.end());
  return names;
}

// "13.0" for CUDART_VERSION 13000: the toolkit this module was compiled with.
std::string cuda_version() {
  return std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
}

// Keys that alr._extension.build_info() overlays on alr._C's.
py::dict build_info() {
  py::dict info;
  info["cuda"] = true;
  info["cuda_version"] = cuda_version();
  info["cuda_kernels"] = cuda_kernels();
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "alr CUDA extension: the CUDA kernels of the alr ops.";
  m.def("build_info", &build_info, "What this module provides: cuda, cuda_version and cuda_kernels.");
}
