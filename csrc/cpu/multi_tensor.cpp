#include "cpu/multi_tensor.h"

#include <stdexcept>

namespace alr {
namespace cpu {

WorkPlan plan_work(const int64_t* numels, int64_t num_tensors, int64_t chunk) {
  if (chunk <= 0 || num_tensors < 0) {
    throw std::invalid_argument("plan_work: chunk must be positive and num_tensors non-negative");
  }
  WorkPlan plan;
  int64_t total_segments = 0;
  for (int64_t i = 0; i < num_tensors; ++i) {
    if (numels[i] < 0) {
      throw std::invalid_argument("plan_work: negative numel");
    }
    // ceil(numel / chunk) without overflow near INT64_MAX.
    total_segments += numels[i] / chunk + (numels[i] % chunk != 0 ? 1 : 0);
  }
  plan.segments.reserve(static_cast<size_t>(total_segments));
  plan.tensor_offsets.reserve(static_cast<size_t>(num_tensors) + 1);
  plan.task_offsets.push_back(0);

  int64_t task_elements = 0;
  for (int64_t i = 0; i < num_tensors; ++i) {
    plan.tensor_offsets.push_back(static_cast<int64_t>(plan.segments.size()));
    const int64_t numel = numels[i];
    for (int64_t begin = 0; begin < numel;) {
      const int64_t end = numel - begin > chunk ? begin + chunk : numel;
      plan.segments.push_back(Segment{i, begin, end});
      task_elements += end - begin;
      if (task_elements >= chunk) {
        plan.task_offsets.push_back(static_cast<int64_t>(plan.segments.size()));
        task_elements = 0;
      }
      begin = end;
    }
  }
  plan.tensor_offsets.push_back(static_cast<int64_t>(plan.segments.size()));
  if (plan.task_offsets.back() != static_cast<int64_t>(plan.segments.size())) {
    plan.task_offsets.push_back(static_cast<int64_t>(plan.segments.size()));
  }
  return plan;
}

}  // namespace cpu
}  // namespace alr
