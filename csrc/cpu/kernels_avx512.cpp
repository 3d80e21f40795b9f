// The kernels for x86-64 CPUs with AVX-512 (F, BW, VL, DQ): 512-bit vectors.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "cpu/kernels.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(ALR_NO_AVX512_KERNELS)
#define ALR_KERNEL_NS avx512
#define ALR_KERNEL_ISA_NAME "avx512"
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,popcnt")
#pragma GCC optimize("fp-contract=off")
#include "alr_math.h"
#include "cpu/kernels_isa.inc"
#pragma GCC pop_options

namespace alr {
namespace cpu {
const KernelTable* kernel_table_avx512() {
  static const KernelTable table = avx512::make_table();
  return &table;
}
}  // namespace cpu
}  // namespace alr

#else
namespace alr {
namespace cpu {
const KernelTable* kernel_table_avx512() { return nullptr; }
}  // namespace cpu
}  // namespace alr
#endif
