// Run-time choice of the kernels' instruction set (see kernels.h).
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <initializer_list>

#include "cpu/kernels.h"

namespace alr {
namespace cpu {
namespace {

bool cpu_has(Isa isa) {
  switch (isa) {
    case Isa::kDefault:
      return true;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    // __builtin_cpu_supports also checks that the OS saves the vector registers (XGETBV).
    case Isa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi") &&
             __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt");
    case Isa::kAvx512:
      return cpu_has(Isa::kAvx2) && __builtin_cpu_supports("avx512f") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512dq");
#endif
    default:
      return false;
  }
}

const KernelTable* table_of(Isa isa) {
  switch (isa) {
    case Isa::kDefault:
      return kernel_table_default();
    case Isa::kAvx2:
      return kernel_table_avx2();
    case Isa::kAvx512:
      return kernel_table_avx512();
  }
  return nullptr;
}

Isa best_isa() {
  for (Isa isa : {Isa::kAvx512, Isa::kAvx2}) {
    if (isa_supported(isa)) {
      return isa;
    }
  }
  return Isa::kDefault;
}

std::atomic<int>& active() {
  static std::atomic<int> isa{static_cast<int>(default_isa())};
  return isa;
}

}  // namespace

bool isa_supported(Isa isa) {
  // The CPU check comes first: a table is built by code compiled for its instruction set.
  return cpu_has(isa) && table_of(isa) != nullptr;
}

Isa default_isa() {
  const char* requested = std::getenv("ALR_CPU_ISA");
  Isa isa;
  if (requested != nullptr && parse_isa(requested, &isa) && isa_supported(isa)) {
    return isa;
  }
  return best_isa();
}

Isa active_isa() { return static_cast<Isa>(active().load(std::memory_order_relaxed)); }

bool set_active_isa(Isa isa) {
  if (!isa_supported(isa)) {
    return false;
  }
  active().store(static_cast<int>(isa), std::memory_order_relaxed);
  return true;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kDefault:
      return "default";
    case Isa::kAvx2:
      return "avx2";
    case Isa::kAvx512:
      return "avx512";
  }
  return "unknown";
}

bool parse_isa(const char* name, Isa* out) {
  for (Isa isa : {Isa::kDefault, Isa::kAvx2, Isa::kAvx512}) {
    if (std::strcmp(name, isa_name(isa)) == 0) {
      *out = isa;
      return true;
    }
  }
  return false;
}

const KernelTable& kernel_table(Isa isa) { return *table_of(isa); }

const KernelTable& kernel_table() { return kernel_table(active_isa()); }

}  // namespace cpu
}  // namespace alr
