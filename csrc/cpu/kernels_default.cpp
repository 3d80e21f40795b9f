// The kernels for any CPU: the compiler's baseline instruction set (SSE2 on x86-64).
//
// std::fma has no baseline x86-64 instruction, so the fused steps call libm here: correct,
// and slower; every x86 CPU since 2013 runs the AVX2 or AVX-512 copy instead.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "cpu/kernels.h"

#define ALR_KERNEL_NS baseline
#define ALR_KERNEL_ISA_NAME "default"
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#elif defined(__clang__)
#pragma clang fp contract(off)
#endif
#include "alr_math.h"
#include "cpu/kernels_isa.inc"
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

namespace alr {
namespace cpu {
const KernelTable* kernel_table_default() {
  static const KernelTable table = baseline::make_table();
  return &table;
}
}  // namespace cpu
}  // namespace alr
