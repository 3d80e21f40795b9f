// The kernels for x86-64 CPUs with AVX2 and FMA (Haswell, Zen and later): 256-bit vectors.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "cpu/kernels.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ALR_KERNEL_NS avx2
#define ALR_KERNEL_ISA_NAME "avx2"
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,popcnt")
#pragma GCC optimize("fp-contract=off")
#include "alr_math.h"
#include "cpu/kernels_isa.inc"
#pragma GCC pop_options

namespace alr {
namespace cpu {
const KernelTable* kernel_table_avx2() {
  static const KernelTable table = avx2::make_table();
  return &table;
}
}  // namespace cpu
}  // namespace alr

#else
namespace alr {
namespace cpu {
const KernelTable* kernel_table_avx2() { return nullptr; }
}  // namespace cpu
}  // namespace alr
#endif
