// The gradient-statistics pre-pass, the deterministic per-tensor sum of chunk partials,
// and the step-counter increment.
#include <c10/cuda/CUDAException.h>

#include "cuda/apply.cuh"
#include "cuda/launch.h"

namespace alr {
namespace cuda {
namespace {

// --- grad_stats -------------------------------------------------------------------------

using GradTable = TableFor<1>::type;

struct GradStatsArgs {
  GradTable table;
  DeviceScalars scalars;
};
static_assert(sizeof(DeviceScalars) <= kReservedArgBytes, "reserve more argument bytes");
static_assert(sizeof(GradStatsArgs) <= kMaxKernelArgBytes, "kernel arguments over 4 KiB");

// {Σ g², number of non-finite g} of g = grad / S. g - g is 0 for a finite g, NaN otherwise.
struct GradStatsOp {
  float scale;
  bool has_scale;

  __device__ __forceinline__ void operator()(float grad, float (&acc)[2]) const {
    const float g = has_scale ? grad / scale : grad;
    acc[0] += g * g;
    acc[1] += (g - g == 0.0f) ? 0.0f : 1.0f;
  }
};

template <typename S>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSm) grad_stats_kernel(const __grid_constant__ GradStatsArgs args) {
  const ChunkOf<GradTable> chunk(args.table);
  GradStatsOp op;
  op.has_scale = args.scalars.grad_scale != nullptr;
  op.scale = op.has_scale ? *args.scalars.grad_scale : 1.0f;
  const S* grad = static_cast<const S*>(args.table.ptrs[0][chunk.slot]) + chunk.begin;
  float acc[2] = {0.0f, 0.0f};
  reduce_chunk(grad, chunk.len, op, acc);
  store_partials(acc, args.scalars.partials, chunk.row);
}

template <typename S>
void launch_grad_stats_typed(const int64_t* numels, int64_t n, const void* const* grads,
                             const DeviceScalars& scalars, cudaStream_t stream) {
  GradStatsArgs args;
  args.scalars = scalars;
  auto set_slot = [&](int slot, int64_t i) { args.table.ptrs[0][slot] = const_cast<void*>(grads[i]); };
  auto run = [&](int blocks) {
    grad_stats_kernel<S><<<blocks, kBlockThreads, 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  pack_launches(numels, n, kChunkSize, args.table, set_slot, run);
}

// --- Per-tensor sums --------------------------------------------------------------------

struct SumArgs {
  SumTable table;
  const double* partials;  // [rows, kWidth]
  float* out;              // [n, kWidth]
  bool last_is_count;
};
static_assert(sizeof(SumArgs) <= kMaxKernelArgBytes, "kernel arguments over 4 KiB");

// Block b sums the rows of tensor table.first + b: thread j adds rows j, j + blockDim, ...
// in order, then block_sum combines the threads in a fixed tree. Deterministic, and the
// same for any packing of chunks into launches.
template <int kWidth>
__global__ void __launch_bounds__(kBlockThreads) sum_partials_kernel(const __grid_constant__ SumArgs args) {
  const int64_t begin = args.table.row_begin[blockIdx.x];
  const int64_t end = args.table.row_begin[blockIdx.x + 1];
  double v[kWidth];
  for (int k = 0; k < kWidth; ++k) {
    v[k] = 0.0;
  }
  for (int64_t r = begin + threadIdx.x; r < end; r += blockDim.x) {
    for (int k = 0; k < kWidth; ++k) {
      v[k] += args.partials[r * kWidth + k];
    }
  }
  block_sum(v);
  if (threadIdx.x == 0) {
    const int64_t tensor = args.table.first + blockIdx.x;
    for (int k = 0; k < kWidth; ++k) {
      const bool count = args.last_is_count && k == kWidth - 1;
      args.out[tensor * kWidth + k] = count ? (v[k] > 0 ? 1.0f : 0.0f) : static_cast<float>(v[k]);
    }
  }
}

template <int kWidth>
void launch_sum_typed(const double* partials, const int64_t* numels, int64_t n, bool last_is_count, float* out,
                      cudaStream_t stream) {
  SumArgs args;
  args.partials = partials;
  args.out = out;
  args.last_is_count = last_is_count;
  pack_row_ranges(numels, n, kChunkSize, args.table, [&](int count) {
    sum_partials_kernel<kWidth><<<count, kBlockThreads, 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// --- Step counters ----------------------------------------------------------------------

struct StepArgs {
  StepTable table;
  const bool* skip;
  int count;
  bool steps_double;
};
static_assert(sizeof(StepArgs) <= kMaxKernelArgBytes, "kernel arguments over 4 KiB");

__global__ void increment_steps_kernel(const __grid_constant__ StepArgs args) {
  const int i = threadIdx.x;
  if (i >= args.count || skipped(args.skip)) {
    return;
  }
  if (args.steps_double) {
    *static_cast<double*>(args.table.steps[i]) += 1.0;
  } else {
    *static_cast<float*>(args.table.steps[i]) += 1.0f;
  }
}

}  // namespace

void launch_grad_stats(Dtype dtype, const int64_t* numels, int64_t n, const void* const* grads,
                       const DeviceScalars& scalars, cudaStream_t stream) {
  dispatch_dtype(dtype, [&](auto storage) {
    launch_grad_stats_typed<typename decltype(storage)::type>(numels, n, grads, scalars, stream);
  });
}

void launch_sum_partials(const double* partials, const int64_t* numels, int64_t n, int width, bool last_is_count,
                         float* out, cudaStream_t stream) {
  if (width == 2) {
    launch_sum_typed<2>(partials, numels, n, last_is_count, out, stream);
  } else {
    launch_sum_typed<3>(partials, numels, n, last_is_count, out, stream);
  }
}

void launch_increment_steps(void* const* steps, int64_t n, bool steps_double, const bool* skip,
                            cudaStream_t stream) {
  StepArgs args;
  args.skip = skip;
  args.steps_double = steps_double;
  for (int64_t first = 0; first < n; first += StepTable::kMaxTensors) {
    args.count = static_cast<int>(n - first < StepTable::kMaxTensors ? n - first : StepTable::kMaxTensors);
    for (int i = 0; i < args.count; ++i) {
      args.table.steps[i] = steps[first + i];
    }
    increment_steps_kernel<<<1, args.count, 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace cuda
}  // namespace alr
