// The CPU kernels of the ALR step on raw memory: no torch types, so the native test
// executable drives them on plain arrays.
//
// A kernel processes one segment [begin, end) of one tensor (see multi_tensor.h); the op
// layer (ops.cpp) prepares one argument record per tensor and runs the segments of a call
// across threads. Statistics are written to the segment's own slot as doubles.
//
// Each kernel is compiled once per instruction set (kernels_default.cpp, kernels_avx2.cpp,
// kernels_avx512.cpp: the same source, kernels_isa.inc, under different GCC target
// pragmas), and kernel_table() picks the best one the CPU supports at run time. The build
// flags need not enable AVX; the results are bit-identical across instruction sets.
#pragma once

#include <cstdint>

namespace alr {
namespace cpu {

enum class Dtype : int { kFloat = 0, kDouble = 1, kBFloat16 = 2, kHalf = 3 };
constexpr int kNumDtypes = 4;

// How a kernel writes the new parameter value p (opmath): rounded to nearest; into the
// float32 master copy, which it also reads instead of the parameter, and its image rounded
// to nearest into the parameter; or rounded stochastically to bfloat16.
enum class ParamWrite : int { kNearest = 0, kMaster = 1, kStochastic = 2 };

// A storage combination with kernels: the parameters' dtype (the gradients have it too),
// the state's dtype and the parameter write.
struct Variant {
  Dtype param;
  Dtype state;
  ParamWrite write;
};

// Every combination the optimizer's options produce (state_dtype is float32 or bfloat16, so
// float16 masters always come with another state dtype). The first kNumDtypes are
// torch.optim's own (state in the parameters' dtype), in Dtype order, so that for them the
// variant index is the dtype.
constexpr Variant kVariants[] = {
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
constexpr int kNumVariants = static_cast<int>(sizeof(kVariants) / sizeof(kVariants[0]));

// The index of a combination in kVariants, or -1.
constexpr int variant_index(Dtype param, Dtype state, ParamWrite write) {
  for (int v = 0; v < kNumVariants; ++v) {
    if (kVariants[v].param == param && kVariants[v].state == state && kVariants[v].write == write) {
      return v;
    }
  }
  return -1;
}

enum class Isa : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };
constexpr int kNumIsas = 3;

// What a kernel does: update in place, update and gather the hypergradient statistics
// against the state before the update, or only gather them (read-only).
enum class Mode : int { kUpdate = 0, kUpdateStats = 1, kStatsOnly = 2 };
constexpr int kNumModes = 3;

// Statistics per segment: Mode::kUpdateStats / kStatsOnly write {g·d_prev, g·g, d_prev²};
// grad-stats kernels write {Σ (grad/S)², nonfinite (0 or 1)}.
constexpr int kHypergradStats = 3;
constexpr int kGradStats = 2;

// Scalars are doubles holding exactly the value the reference rounds to opmath; a kernel
// converts them to its opmath type (float, or double for float64 storage) once per call.
struct GradArgs {
  const void* grad;
  double grad_scale;    // divides the gradient (read only by grad_scale variants)
  double grad_mult;     // ±clip coefficient, or ±1: maximize and clipping in one product
  double weight_decay;  // λ of coupled decay
  bool coupled_decay;   // g += λ·p (Adam with L2 decay, SGD)
};

// Where the new parameter value goes (see ParamWrite).
struct ParamArgs {
  void* param;
  float* master;             // kMaster variants: the float32 master copy
  uint32_t rounding_stream;  // kStochastic variants: the tensor's stream s of this step
};

struct AdamArgs {
  GradArgs grad;
  ParamArgs param;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;  // amsgrad variants only
  double decay_factor;   // 1 - α·λ (decoupled decay), else 1
  double lerp_weight;    // 1 - β1
  double beta2;
  double one_minus_beta2;
  double eps;
  double bias_correction2_sqrt;  // √(1 - β2^t)
  double neg_step_size;          // -α / (1 - β1^t)
  // d_{t-1} for the statistics (see alr_math.h adam_prev_direction), with the corrections
  // of step max(t-1, 1): √(1 - β2^(t-1)) / (1 - β1^(t-1)) and ε·√(1 - β2^(t-1)).
  double prev_direction_scale;
  double prev_direction_eps;
};

struct SgdArgs {
  GradArgs grad;
  ParamArgs param;
  void* momentum_buffer;  // momentum variants
  void* prev_direction;   // store-prev variants: receives d_t (and holds d_{t-1})
  double momentum;
  double damp_weight;     // w of b = μ·b + w·g (1 without dampening and on the first step)
  double neg_lr;          // -α
  bool nesterov;
};

using AdamKernel = void (*)(const AdamArgs& args, int64_t begin, int64_t end, double* stats);
using SgdKernel = void (*)(const SgdArgs& args, int64_t begin, int64_t end, double* stats);
using GradStatsKernel = void (*)(const GradArgs& args, int64_t begin, int64_t end, double* stats);

// The variants beyond torch.optim's always divide by the scale (by 1 without a GradScaler,
// which is exact): the [grad_scale] dimension is specialised for the common layouts only,
// which keeps the number of kernels (and the build time) down.
struct KernelTable {
  const char* isa;
  // [variant][grad_scale][amsgrad][mode]
  AdamKernel adam[kNumVariants][2][2][kNumModes];
  // [variant][grad_scale][momentum][store_prev][mode]. In kStatsOnly mode (and for the
  // statistics of kUpdateStats) d_{t-1} is read from prev_direction when store_prev, else
  // from momentum_buffer; the momentum index is ignored by kStatsOnly.
  SgdKernel sgd[kNumVariants][2][2][2][kNumModes];
  // [dtype][grad_scale]
  GradStatsKernel grad_stats[kNumDtypes][2];
};

// The tables each instruction-set translation unit provides; nullptr where that
// instruction set was not compiled in (non-x86 targets, compilers other than GCC).
const KernelTable* kernel_table_default();
const KernelTable* kernel_table_avx2();
const KernelTable* kernel_table_avx512();

// Whether this CPU can run the given table's instructions and the table exists.
bool isa_supported(Isa isa);
// The best supported instruction set, unless ALR_CPU_ISA ("default", "avx2", "avx512")
// names a supported one.
Isa default_isa();
// The instruction set kernel_table() uses now (default_isa() until changed).
Isa active_isa();
// Use `isa` from now on; false (and nothing changes) when it is not supported.
bool set_active_isa(Isa isa);
const char* isa_name(Isa isa);
// parse "default" / "avx2" / "avx512"; false for anything else.
bool parse_isa(const char* name, Isa* out);

const KernelTable& kernel_table();
const KernelTable& kernel_table(Isa isa);  // isa must be supported

}  // namespace cpu
}  // namespace alr
