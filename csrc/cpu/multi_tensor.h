// How one multi-tensor call splits its work: a pure function of the tensors' sizes.
//
// Every tensor is cut into segments of at most `chunk` elements at multiples of `chunk`
// (its last segment may be shorter; an empty tensor has none). Consecutive segments are
// packed into tasks of at least `chunk` elements (the last task may be smaller), so 1,000
// tensors of 1,024 elements make about 31 tasks of 32K elements, not 1,000 tiny ones, and
// the threads of at::parallel_for receive balanced contiguous ranges of tasks.
//
// Segments, not threads, own the partial statistics: each segment writes its own slot and
// the slots of a tensor are summed in segment order, so results do not depend on the
// number of threads. All offsets are int64: a tensor may exceed 2^31 elements.
#pragma once

#include <cstdint>
#include <vector>

namespace alr {
namespace cpu {

struct Segment {
  int64_t tensor;  // index of the tensor in the call's lists
  int64_t begin;   // first element, an offset into the tensor
  int64_t end;     // one past the last element
};

struct WorkPlan {
  std::vector<Segment> segments;        // tensor-major, in element order
  std::vector<int64_t> tensor_offsets;  // size n + 1: tensor i owns segments [t[i], t[i+1])
  std::vector<int64_t> task_offsets;    // size tasks + 1: task k runs segments [k[k], k[k+1])

  int64_t num_tasks() const { return static_cast<int64_t>(task_offsets.size()) - 1; }
};

// Elements per segment: 32K floats is 896 KiB of AdamW traffic (p, g, m, v read; p, m, v
// written), enough to amortise the per-segment set-up, small enough to balance two threads
// across a handful of large tensors.
constexpr int64_t kDefaultChunk = int64_t{1} << 15;

// The plan for tensors of the given element counts (each >= 0). chunk must be positive.
WorkPlan plan_work(const int64_t* numels, int64_t num_tensors, int64_t chunk = kDefaultChunk);

}  // namespace cpu
}  // namespace alr
