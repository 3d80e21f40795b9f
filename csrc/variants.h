// The storage variants of the step kernels: one list for the CPU and the CUDA builds.
//
// A variant is what a step kernel is compiled for: the parameters' dtype (the gradients
// have it too), the dtype of every state tensor and how the new parameter value is written.
// Everything else about a call (the mode, amsgrad, momentum, the GradScaler, ...) is a
// run-time argument of the kernels. The CPU builds a kernel for every entry of
// kStorageVariants; the CUDA build for those without float64 (cuda_variants below).
#pragma once

#include <array>
#include <cstddef>

namespace alr {

enum class Dtype : int { kFloat = 0, kDouble = 1, kBFloat16 = 2, kHalf = 3 };
constexpr int kNumDtypes = 4;

// How a kernel writes the new parameter value p (opmath): rounded to nearest even; into the
// float32 master copy, which it also reads instead of the parameter, and its image rounded
// to nearest into the parameter; or rounded stochastically to bfloat16 (alr_math.h's
// float_to_bf16_stochastic, with the stream of the tensor's rounding key and step).
enum class ParamWrite : int { kNearest = 0, kMaster = 1, kStochastic = 2 };

struct Variant {
  Dtype param;
  Dtype state;
  ParamWrite write;
};

constexpr bool operator==(const Variant& a, const Variant& b) {
  return a.param == b.param && a.state == b.state && a.write == b.write;
}

// Every combination the optimizer's options produce (state_dtype is float32 or bfloat16, so
// float16 masters always come with another state dtype). The first kNumDtypes are
// torch.optim's own (state in the parameters' dtype, rounded to nearest), in Dtype order.
inline constexpr Variant kStorageVariants[] = {
    {Dtype::kFloat, Dtype::kFloat, ParamWrite::kNearest},
    {Dtype::kDouble, Dtype::kDouble, ParamWrite::kNearest},
    {Dtype::kBFloat16, Dtype::kBFloat16, ParamWrite::kNearest},
    {Dtype::kHalf, Dtype::kHalf, ParamWrite::kNearest},
    {Dtype::kFloat, Dtype::kBFloat16, ParamWrite::kNearest},
    {Dtype::kDouble, Dtype::kFloat, ParamWrite::kNearest},
    {Dtype::kDouble, Dtype::kBFloat16, ParamWrite::kNearest},
    {Dtype::kBFloat16, Dtype::kFloat, ParamWrite::kNearest},
    {Dtype::kBFloat16, Dtype::kFloat, ParamWrite::kMaster},
    {Dtype::kBFloat16, Dtype::kBFloat16, ParamWrite::kMaster},
    {Dtype::kBFloat16, Dtype::kFloat, ParamWrite::kStochastic},
    {Dtype::kBFloat16, Dtype::kBFloat16, ParamWrite::kStochastic},
    {Dtype::kHalf, Dtype::kFloat, ParamWrite::kNearest},
    {Dtype::kHalf, Dtype::kBFloat16, ParamWrite::kNearest},
    {Dtype::kHalf, Dtype::kFloat, ParamWrite::kMaster},
    {Dtype::kHalf, Dtype::kBFloat16, ParamWrite::kMaster},
};

// torch.optim's own storage: the state in the parameters' dtype, rounded to nearest.
constexpr bool is_torch_storage(const Variant& v) { return v.state == v.param && v.write == ParamWrite::kNearest; }

constexpr bool has_no_float64(const Variant& v) { return v.param != Dtype::kDouble && v.state != Dtype::kDouble; }

// The entries of kStorageVariants that `keep` accepts, in its order (N of them).
template <size_t N>
constexpr std::array<Variant, N> storage_variants_where(bool (*keep)(const Variant&)) {
  std::array<Variant, N> out{};
  size_t k = 0;
  for (const Variant& v : kStorageVariants) {
    if (keep(v)) {
      out[k++] = v;
    }
  }
  return out;
}

constexpr size_t count_storage_variants_where(bool (*keep)(const Variant&)) {
  size_t n = 0;
  for (const Variant& v : kStorageVariants) {
    n += keep(v) ? 1 : 0;
  }
  return n;
}

// The CUDA kernels' variants: float64 runs on the CPU and reference backends only.
inline constexpr auto kCudaVariants =
    storage_variants_where<count_storage_variants_where(has_no_float64)>(has_no_float64);

// The index of `v` in `list`, or -1.
template <typename List>
constexpr int index_of_variant(const List& list, const Variant& v) {
  int i = 0;
  for (const Variant& entry : list) {
    if (entry == v) {
      return i;
    }
    ++i;
  }
  return -1;
}

}  // namespace alr
