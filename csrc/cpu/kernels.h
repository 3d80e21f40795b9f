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
// The CPU kernels of the ALR step on raw memory: no torch types, so the native test
// executable drives them on plain arrays.
//
// A kernel processes one segment [begin, end) of one tensor (see multi_tensor.h); the op
// layer (ops.cpp) prepares one argument record per tensor and runs the segments of a call
// across threads. Statistics are written to the segment's own slot as doubles.
//
// There is one kernel per algorithm and storage variant (csrc/variants.h): everything else
// about a call (the mode, amsgrad, momentum, storing the previous direction, Nesterov, the
// GradScaler's division) is a run-time field of the argument record. A kernel resolves
// those flags once per segment, by branching to an element loop compiled for their values,
// or applies them per element where that costs (next to) nothing: kernels_isa.inc's
// kPerElement says which, in one place. Adding a flag adds loops, not kernels, and the
// table keeps its shape.
//
// Each kernel is compiled once per instruction set (kernels_default.cpp, kernels_avx2.cpp,
// kernels_avx512.cpp: the same source, kernels_isa.inc, under different GCC target
// pragmas), and kernel_table() picks the best one the CPU supports at run time. The build
// flags need not enable AVX; the results are bit-identical across instruction sets.
#pragma once

#include <cstdint>

#include "variants.h"

namespace alr {
namespace cpu {

using alr::Dtype;
using alr::kNumDtypes;
using alr::ParamWrite;
using alr::Variant;

// The CPU has kernels for every storage variant. The first kNumDtypes are torch.optim's
// own, in Dtype order, so that for them the variant index is the dtype.
inline constexpr const auto& kVariants = kStorageVariants;
constexpr int kNumVariants = static_cast<int>(sizeof(kVariants) / sizeof(kVariants[0]));
static_assert(index_of_variant(kStorageVariants, Variant{Dtype::kHalf, Dtype::kHalf, ParamWrite::kNearest}) ==
                  static_cast<int>(Dtype::kHalf),
              "torch.optim's variants come first, in Dtype order");

// The index of a combination in kVariants, or -1.
constexpr int variant_index(Dtype param, Dtype state, ParamWrite write) {
  return index_of_variant(kVariants, Variant{param, state, write});
}

enum class Isa : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };
constexpr int kNumIsas = 3;

// What a kernel does (a run-time field of its arguments): update in place, update and
// gather the hypergradient statistics against the state before the update, or only gather
// them (read-only: a stochastic-rounding variant then reads its parameters as stored).
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
  bool has_scale;       // a GradScaler's scale divides the gradient
  double grad_scale;    // the scale (1 without one: the kernels may divide by it anyway)
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
  Mode mode;
  bool amsgrad;  // v̂ = max(v̂, v) in max_exp_avg_sq replaces v in the denominator
  GradArgs grad;
  ParamArgs param;
  void* exp_avg;
  void* exp_avg_sq;
  // amsgrad's v̂; without amsgrad exp_avg_sq itself (a kernel that selects amsgrad per
  // element reads and writes v through it too: see kernels_isa.inc kPerElement).
  void* max_exp_avg_sq;
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

// d_{t-1} of the statistics is read from prev_direction when store_prev, else it is the
// momentum buffer before the update (in Mode::kStatsOnly momentum_buffer is read for it even
// without momentum), else 0.
struct SgdArgs {
  Mode mode;
  bool momentum_enabled;  // μ != 0: b = μ·b + w·g in momentum_buffer
  bool store_prev;        // d_t goes to prev_direction (which holds d_{t-1})
  GradArgs grad;
  ParamArgs param;
  void* momentum_buffer;
  void* prev_direction;
  double momentum;
  double damp_weight;     // w of b = μ·b + w·g (1 without dampening and on the first step)
  double neg_lr;          // -α
  bool nesterov;
};

using AdamKernel = void (*)(const AdamArgs& args, int64_t begin, int64_t end, double* stats);
using SgdKernel = void (*)(const SgdArgs& args, int64_t begin, int64_t end, double* stats);
using GradStatsKernel = void (*)(const GradArgs& args, int64_t begin, int64_t end, double* stats);

struct KernelTable {
  const char* isa;
  AdamKernel adam[kNumVariants];
  SgdKernel sgd[kNumVariants];
  GradStatsKernel grad_stats[kNumDtypes];
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
