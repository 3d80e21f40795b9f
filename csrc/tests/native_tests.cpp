// Native tests of the CPU kernels without Python or torch: the element math of alr_math.h,
// the 16-bit conversions, the kernels on plain arrays (torch.optim's storage variants
// against a scalar loop over alr_math.h, every variant and run-time flag across instruction
// sets) and the multi-tensor work plan, including tensors of more than 2^31 elements
// (planned, never allocated). Also the host side of
// the CUDA multi-tensor apply (csrc/cuda/multi_tensor.h): how chunks are packed into
// launches and statistics rows, which needs no GPU.
//
// Built and registered with ctest by CMakeLists.txt (target alr_native_tests); exits
// non-zero when a check fails. Runs in about a second, under ASan/UBSan in a few.

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "algorithms.h"
#include "cpu/kernels.h"
#include "cpu/multi_tensor.h"
#include "cuda/multi_tensor.h"

// The reference formulas below must round like the kernels: no contraction into fma.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#elif defined(__clang__)
#pragma clang fp contract(off)
#endif
#include "alr_math.h"

namespace {

using namespace alr;
using namespace alr::cpu;
using math::bf16_t;
using math::fp16_t;

int g_failures = 0;
int g_checks = 0;

#define CHECK(cond, ...)                                                   \
  do {                                                                     \
    ++g_checks;                                                            \
    if (!(cond)) {                                                         \
      if (++g_failures <= 30) {                                            \
        std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);        \
        std::printf(__VA_ARGS__);                                          \
        std::printf("\n");                                                 \
      }                                                                    \
    }                                                                      \
  } while (0)

uint32_t bits(float f) { return math::bits_from_float(f); }
uint64_t bits(double d) { return math::bits_from_double(d); }
bool same_bits(float a, float b) { return bits(a) == bits(b); }
bool same_bits(double a, double b) { return bits(a) == bits(b); }

// --- 16-bit conversions --------------------------------------------------------------------

// Round-to-nearest-even on the bit pattern (adjacent patterns are adjacent values).
uint16_t bf16_reference(float f) {
  if (std::isnan(f)) {
    return 0x7FC0;
  }
  const uint32_t u = bits(f);
  uint32_t t = u >> 16;
  const uint32_t rest = u & 0xFFFFu;
  if (rest > 0x8000u || (rest == 0x8000u && (t & 1u))) {
    ++t;
  }
  return static_cast<uint16_t>(t);
}

double fp16_value(uint16_t h) {
  const int sign = h >> 15, exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF;
  double v;
  if (exponent == 0x1F) {
    v = mantissa ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  } else if (exponent == 0) {
    v = std::ldexp(static_cast<double>(mantissa), -24);
  } else {
    v = std::ldexp(static_cast<double>(1024 + mantissa), exponent - 25);
  }
  return sign ? -v : v;
}

// The nearest half (ties to even) computed in double: an independent statement of RNE.
uint16_t fp16_reference(float f) {
  const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
  if (std::isnan(f)) {
    return sign | 0x7E00;
  }
  const double a = std::fabs(static_cast<double>(f));
  if (a >= 65520.0) {
    return sign | 0x7C00;
  }
  if (a < std::ldexp(1.0, -14)) {
    return sign | static_cast<uint16_t>(std::nearbyint(std::ldexp(a, 24)));  // subnormal (or 1024)
  }
  int e;
  std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
  double q = std::nearbyint(std::ldexp(a, 11 - e));  // in [1024, 2048]
  int exponent = e - 1 + 15;
  if (q == 2048) {
    q = 1024;
    ++exponent;
  }
  if (exponent >= 31) {
    return sign | 0x7C00;
  }
  return sign | static_cast<uint16_t>((exponent << 10) | (static_cast<int>(q) - 1024));
}

void test_bf16_conversions() {
  for (uint32_t h = 0; h < 0x10000u; ++h) {
    const float f = math::bf16_to_float(bf16_t{static_cast<uint16_t>(h)});
    CHECK(bits(f) == h << 16, "bf16 %04x widens to %08x", h, bits(f));
    const uint16_t back = math::float_to_bf16(f).bits;
    CHECK(back == (std::isnan(f) ? 0x7FC0 : h), "bf16 %04x round trip gives %04x", h, back);
  }
  std::mt19937 rng(1);
  for (int i = 0; i < 2000000; ++i) {
    uint32_t u = rng();
    if (i % 4 == 0) {
      u = (u & 0xFFFF0000u) | 0x8000u;  // exact ties
    }
    const float f = math::float_from_bits(u);
    CHECK(math::float_to_bf16(f).bits == bf16_reference(f), "float %08x -> bf16 %04x, expected %04x", u,
          math::float_to_bf16(f).bits, bf16_reference(f));
  }
}

void test_fp16_conversions() {
  for (uint32_t h = 0; h < 0x10000u; ++h) {
    const float f = math::fp16_to_float(fp16_t{static_cast<uint16_t>(h)});
    const double expected = fp16_value(static_cast<uint16_t>(h));
    if (std::isnan(expected)) {
      CHECK(std::isnan(f) && (bits(f) & 0x1FFFu) == 0 && ((bits(f) >> 13) & 0x3FFu) == (h & 0x3FFu),
            "half %04x (NaN) widens to %08x", h, bits(f));
      CHECK(math::float_to_fp16(f).bits == ((h & 0x8000u) | 0x7E00u), "half NaN %04x narrows to %04x", h,
            math::float_to_fp16(f).bits);
    } else {
      CHECK(static_cast<double>(f) == expected && std::signbit(f) == ((h & 0x8000u) != 0),
            "half %04x widens to %a, expected %a", h, f, expected);
      CHECK(math::float_to_fp16(f).bits == h, "half %04x round trip gives %04x", h, math::float_to_fp16(f).bits);
    }
  }
  std::mt19937 rng(2);
  for (int i = 0; i < 2000000; ++i) {
    uint32_t u = rng();
    if (i % 2 == 0) {
      // Concentrate on the half range (exponents 2^-26 .. 2^17), with ties every 4th.
      const uint32_t exponent = 101 + rng() % 43;
      u = (u & 0x807FFFFFu) | (exponent << 23);
      if (i % 8 == 0) {
        u = (u & 0xFFFFE000u) | 0x1000u;
      }
    }
    const float f = math::float_from_bits(u);
    CHECK(math::float_to_fp16(f).bits == fp16_reference(f), "float %08x (%a) -> half %04x, expected %04x", u,
          f, math::float_to_fp16(f).bits, fp16_reference(f));
  }
#if defined(__FLT16_MAX__) && !defined(__clang__)
  // The compiler's own conversion agrees on every non-NaN input sampled.
  for (int i = 0; i < 200000; ++i) {
    const float f = math::float_from_bits(rng());
    if (std::isnan(f)) {
      continue;
    }
    const _Float16 h = static_cast<_Float16>(f);
    uint16_t hb;
    std::memcpy(&hb, &h, 2);
    CHECK(math::float_to_fp16(f).bits == hb, "float %a: _Float16 gives %04x, alr %04x", f, hb,
          math::float_to_fp16(f).bits);
  }
#endif
}

// --- Element math ------------------------------------------------------------------------------

void test_element_math() {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  // torch.maximum propagates NaN from either side.
  CHECK(std::isnan(math::maximum(nan, 1.0f)) && std::isnan(math::maximum(1.0f, nan)), "maximum NaN");
  CHECK(math::maximum(2.0f, 1.0f) == 2.0f && math::maximum(-1.0f, 3.0f) == 3.0f, "maximum");
  CHECK(same_bits(math::select(true, -0.0f, 1.0f), -0.0f) && same_bits(math::select(false, 1.0, -0.0), -0.0),
        "select");

  std::mt19937 rng(3);
  std::normal_distribution<float> normal;
  for (int i = 0; i < 100000; ++i) {
    const float a = normal(rng), b = normal(rng);
    // lerp: both branches of torch's formula, as fused multiply-adds.
    for (float w : {0.1f, 0.7f, 0.5f, 0.0f, 1.0f}) {
      const float expected = std::fabs(w) < 0.5f ? std::fma(w, b - a, a) : std::fma(w - 1.0f, b - a, b);
      CHECK(same_bits(math::lerp(a, b, math::lerp_weight(w)), expected), "lerp(%a, %a, %a)", a, b, w);
    }
    // The effective gradient: reference order unscale, negate, clip, coupled decay.
    const float grad = normal(rng) * 100.0f, p = normal(rng), scale = 1024.0f, clip = 0.37f, wd = 0.01f;
    const float reference = std::fma(p, wd, (-(grad / scale)) * clip);
    CHECK(same_bits(math::effective_grad<true>(grad, p, scale, -clip, wd, true), reference), "effective grad %a",
          grad);
    CHECK(same_bits(math::effective_grad<false>(grad, p, scale, 1.0f, wd, false), grad), "identity grad %a", grad);
  }

  // Adam against the reference's chain of torch ops, operation by operation.
  for (int i = 0; i < 100000; ++i) {
    const float g = normal(rng) * 1e-2f;
    float p = normal(rng), m = normal(rng) * 1e-3f, v = std::fabs(normal(rng)) * 1e-5f, vmax = v * 1.5f;
    const double alpha = 1e-3, wd = 0.01, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, t = 1 + i % 50;
    const double bc1 = 1 - std::pow(beta1, t), bc2_sqrt = std::sqrt(1 - std::pow(beta2, t));
    math::AdamScalars<float> s;
    s.decay_factor = static_cast<float>(1 - alpha * wd);
    s.beta1 = math::lerp_weight(static_cast<float>(1 - beta1));
    s.beta2 = static_cast<float>(beta2);
    s.one_minus_beta2 = static_cast<float>(1 - beta2);
    s.eps = static_cast<float>(eps);
    s.bias_correction2_sqrt = static_cast<float>(bc2_sqrt);
    s.neg_step_size = static_cast<float>(-alpha / bc1);
    float rp = p * s.decay_factor;
    const float rm = std::fma(s.beta1.coeff, g - m, m);  // 1 - β1 < 0.5
    const float rv = v * s.beta2 + (s.one_minus_beta2 * g) * g;
    const float rvmax = std::max(vmax, rv);
    rp = rp + (rm * s.neg_step_size) / (std::sqrt(rvmax) / s.bias_correction2_sqrt + s.eps);
    const float p0 = p, m0 = m, v0 = v, vmax0 = vmax;
    math::adam_update<true>(p, m, v, vmax, g, s);
    CHECK(same_bits(p, rp) && same_bits(m, rm) && same_bits(v, rv) && same_bits(vmax, rvmax), "adam step %d", i);

    // amsgrad selected at run time gives the same bits; without it v̂ receives the new v.
    for (const bool amsgrad : {false, true}) {
      float fp = p0, fm = m0, fv = v0, fvmax = vmax0;
      float sp = p0, sm = m0, sv = v0, svmax = amsgrad ? vmax0 : v0;
      if (amsgrad) {
        math::adam_update<true>(fp, fm, fv, fvmax, g, s);
      } else {
        math::adam_update<false>(fp, fm, fv, fvmax, g, s);
      }
      math::adam_update_select_amsgrad(amsgrad, sp, sm, sv, svmax, g, s);
      CHECK(same_bits(sp, fp) && same_bits(sm, fm) && same_bits(sv, fv) && same_bits(svmax, amsgrad ? fvmax : fv),
            "adam step %d with amsgrad %d selected", i, static_cast<int>(amsgrad));
    }
  }

  // The rearranged d_{t-1} stays within a few ulp of the reference's two-division form.
  for (int i = 0; i < 100000; ++i) {
    const double t = 1 + i % 1000;
    const double bc1 = 1 - std::pow(0.9, t), bc2_sqrt = std::sqrt(1 - std::pow(0.999, t));
    const float m = normal(rng) * 1e-3f, v = std::fabs(normal(rng)) * 1e-6f;
    const float eps = 1e-8f;
    const float reference = (m / static_cast<float>(bc1)) / (std::sqrt(v) / static_cast<float>(bc2_sqrt) + eps);
    const float got = math::adam_prev_direction(m, v, static_cast<float>(bc2_sqrt / bc1),
                                                static_cast<float>(1e-8 * bc2_sqrt));
    CHECK(std::fabs(got - reference) <= 4 * std::numeric_limits<float>::epsilon() * std::fabs(reference),
          "prev direction %a vs %a", got, reference);
  }

  // SGD: momentum buffer, Nesterov and the update.
  for (int i = 0; i < 100000; ++i) {
    const float g = normal(rng), p0 = normal(rng), b0 = normal(rng);
    math::SgdScalars<float> s{0.9f, 0.7f, (i & 1) != 0, -0.01f};
    float p = p0, b = b0;
    const float d = math::sgd_update<true>(p, b, g, s);
    const float rb = b0 * 0.9f + g * 0.7f;
    const float rd = s.nesterov ? std::fma(rb, 0.9f, g) : rb;
    CHECK(same_bits(b, rb) && same_bits(d, rd) && same_bits(p, p0 + rd * -0.01f), "sgd step %d", i);
  }
}

// --- Kernels on plain arrays ---------------------------------------------------------------------

template <typename S>
S from_float(double x);
template <>
float from_float<float>(double x) {
  return static_cast<float>(x);
}
template <>
double from_float<double>(double x) {
  return x;
}
template <>
bf16_t from_float<bf16_t>(double x) {
  return math::float_to_bf16(static_cast<float>(x));
}
template <>
fp16_t from_float<fp16_t>(double x) {
  return math::float_to_fp16(static_cast<float>(x));
}

template <typename S>
bool equal_bytes(const std::vector<S>& a, const std::vector<S>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(S)) == 0);
}

template <typename S>
struct AdamArrays {
  std::vector<S> p, g, m, v, vmax;
  explicit AdamArrays(int64_t n, uint32_t seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<double> normal;
    for (int64_t i = 0; i < n; ++i) {
      p.push_back(from_float<S>(normal(rng)));
      g.push_back(from_float<S>(normal(rng) * 0.1));
      m.push_back(from_float<S>(normal(rng) * 0.01));
      v.push_back(from_float<S>(std::fabs(normal(rng)) * 1e-3));
      vmax.push_back(from_float<S>(std::fabs(normal(rng)) * 1e-3));
    }
  }
  AdamArgs args(bool coupled) {
    AdamArgs a{};
    a.grad.grad = g.data();
    a.grad.grad_scale = 8.0;
    a.grad.grad_mult = -0.5;
    a.grad.weight_decay = 0.01;
    a.grad.coupled_decay = coupled;
    a.param.param = p.data();
    a.exp_avg = m.data();
    a.exp_avg_sq = v.data();
    a.max_exp_avg_sq = vmax.data();
    a.decay_factor = coupled ? 1.0 : 1 - 1e-3 * 0.01;
    a.lerp_weight = coupled ? 0.1 : 0.7;  // both lerp branches
    a.beta2 = 0.999;
    a.one_minus_beta2 = 1 - 0.999;
    a.eps = 1e-8;
    a.bias_correction2_sqrt = 0.3;
    a.neg_step_size = -1e-3 / 0.2;
    a.prev_direction_scale = 0.25 / 0.15;
    a.prev_direction_eps = 1e-8 * 0.25;
    return a;
  }
};

// The kernel over [0, n) must equal a scalar loop over alr_math.h, element by element.
template <typename S, int kDtype>
void check_adam(const KernelTable& table, int64_t n) {
  using T = math::opmath_t<S>;
  for (int scale = 0; scale < 2; ++scale) {
    for (int amsgrad = 0; amsgrad < 2; ++amsgrad) {
      for (int mode = 0; mode < kNumModes; ++mode) {
        const bool coupled = (scale + amsgrad + mode) % 2 == 0;
        AdamArrays<S> got(n, 7), want(n, 7);
        AdamArgs a = got.args(coupled);
        a.mode = static_cast<Mode>(mode);
        a.amsgrad = amsgrad != 0;
        a.max_exp_avg_sq = amsgrad ? got.vmax.data() : got.v.data();  // as the op layer passes them
        a.grad.has_scale = scale != 0;
        a.grad.grad_scale = scale ? 8.0 : 1.0;
        double stats[kHypergradStats] = {0, 0, 0};
        table.adam[kDtype](a, 0, n, stats);
        double dot = 0, gg = 0, dd = 0;
        math::AdamScalars<T> s;
        s.decay_factor = static_cast<T>(a.decay_factor);
        s.beta1 = math::lerp_weight(static_cast<T>(a.lerp_weight));
        s.beta2 = static_cast<T>(a.beta2);
        s.one_minus_beta2 = static_cast<T>(a.one_minus_beta2);
        s.eps = static_cast<T>(a.eps);
        s.bias_correction2_sqrt = static_cast<T>(a.bias_correction2_sqrt);
        s.neg_step_size = static_cast<T>(a.neg_step_size);
        for (int64_t i = 0; i < n; ++i) {
          T p = math::load(&want.p[i]), m = math::load(&want.m[i]), v = math::load(&want.v[i]);
          T vmax = math::load(&want.vmax[i]);
          const T g = scale ? math::effective_grad<true>(math::load(&want.g[i]), p, T(8), T(-0.5), T(0.01), coupled)
                            : math::effective_grad<false>(math::load(&want.g[i]), p, T(8), T(-0.5), T(0.01), coupled);
          const T d = math::adam_prev_direction(m, amsgrad ? vmax : v, static_cast<T>(a.prev_direction_scale),
                                                static_cast<T>(a.prev_direction_eps));
          dot += static_cast<double>(g * d);
          gg += static_cast<double>(g * g);
          dd += static_cast<double>(d * d);
          if (mode != static_cast<int>(Mode::kStatsOnly)) {
            if (amsgrad) {
              math::adam_update<true>(p, m, v, vmax, g, s);
            } else {
              math::adam_update<false>(p, m, v, vmax, g, s);
            }
            math::store(&want.p[i], p);
            math::store(&want.m[i], m);
            math::store(&want.v[i], v);
            if (amsgrad) {
              math::store(&want.vmax[i], vmax);
            }
          }
        }
        const std::string what = std::string(table.isa) + " adam dtype " + std::to_string(kDtype) + " scale " +
                                 std::to_string(scale) + " amsgrad " + std::to_string(amsgrad) + " mode " +
                                 std::to_string(mode) + " n " + std::to_string(n);
        CHECK(equal_bytes(got.p, want.p) && equal_bytes(got.m, want.m) && equal_bytes(got.v, want.v) &&
                  equal_bytes(got.vmax, want.vmax) && equal_bytes(got.g, want.g),
              "%s: elements differ from the scalar loop", what.c_str());
        if (mode != static_cast<int>(Mode::kUpdate)) {
          const double tol = sizeof(T) == 4 ? 1e-5 : 1e-12;
          // |g·d| <= |g|·|d|: the dot product's error scales with sqrt(gg * dd).
          CHECK(std::fabs(stats[0] - dot) <= tol * std::sqrt(gg * dd) && std::fabs(stats[1] - gg) <= tol * gg &&
                    std::fabs(stats[2] - dd) <= tol * dd,
                "%s: stats %g %g %g vs %g %g %g", what.c_str(), stats[0], stats[1], stats[2], dot, gg, dd);
        }
      }
    }
  }
}

template <typename S>
struct SgdArrays {
  std::vector<S> p, g, b, prev;
  explicit SgdArrays(int64_t n, uint32_t seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<double> normal;
    for (int64_t i = 0; i < n; ++i) {
      p.push_back(from_float<S>(normal(rng)));
      g.push_back(from_float<S>(normal(rng)));
      b.push_back(from_float<S>(normal(rng)));
      prev.push_back(from_float<S>(normal(rng)));
    }
  }
};

template <typename S, int kDtype>
void check_sgd(const KernelTable& table, int64_t n) {
  using T = math::opmath_t<S>;
  for (int scale = 0; scale < 2; ++scale) {
    for (int momentum = 0; momentum < 2; ++momentum) {
      for (int store_prev = 0; store_prev < 2; ++store_prev) {
        for (int mode = 0; mode < kNumModes; ++mode) {
          const bool stats_mode = mode != static_cast<int>(Mode::kUpdate);
          if (stats_mode && !momentum && !store_prev) {
            continue;  // no source for d_{t-1}: the op layer rejects this
          }
          const bool nesterov = momentum && (scale + mode) % 2 == 0;
          SgdArrays<S> got(n, 11), want(n, 11);
          SgdArgs a{};
          a.mode = static_cast<Mode>(mode);
          a.momentum_enabled = momentum != 0;
          a.store_prev = store_prev != 0;
          a.grad.grad = got.g.data();
          a.grad.has_scale = scale != 0;
          a.grad.grad_scale = scale ? 4.0 : 1.0;
          a.grad.grad_mult = 0.8;
          a.grad.weight_decay = 0.05;
          a.grad.coupled_decay = (mode % 2) == 0;
          a.param.param = got.p.data();
          a.momentum_buffer = got.b.data();
          a.prev_direction = got.prev.data();
          a.momentum = 0.9;
          a.damp_weight = 0.7;
          a.nesterov = nesterov;
          a.neg_lr = -0.01;
          double stats[kHypergradStats] = {0, 0, 0};
          table.sgd[kDtype](a, 0, n, stats);
          const math::SgdScalars<T> s{T(0.9), T(0.7), nesterov, T(-0.01)};
          double dot = 0, gg = 0, dd = 0;
          for (int64_t i = 0; i < n; ++i) {
            T p = math::load(&want.p[i]), b = math::load(&want.b[i]);
            const T g =
                scale ? math::effective_grad<true>(math::load(&want.g[i]), p, T(4), T(0.8), T(0.05), a.grad.coupled_decay)
                      : math::effective_grad<false>(math::load(&want.g[i]), p, T(4), T(0.8), T(0.05), a.grad.coupled_decay);
            const T d_prev = store_prev ? math::load(&want.prev[i]) : b;
            dot += static_cast<double>(g * d_prev);
            gg += static_cast<double>(g * g);
            dd += static_cast<double>(d_prev * d_prev);
            if (!stats_mode || mode == static_cast<int>(Mode::kUpdateStats)) {
              const T d = momentum ? math::sgd_update<true>(p, b, g, s) : math::sgd_update<false>(p, b, g, s);
              math::store(&want.p[i], p);
              if (momentum) {
                math::store(&want.b[i], b);
              }
              if (store_prev) {
                math::store(&want.prev[i], d);
              }
            }
          }
          const std::string what = std::string(table.isa) + " sgd dtype " + std::to_string(kDtype) + " scale " +
                                   std::to_string(scale) + " momentum " + std::to_string(momentum) + " store_prev " +
                                   std::to_string(store_prev) + " mode " + std::to_string(mode);
          CHECK(equal_bytes(got.p, want.p) && equal_bytes(got.b, want.b) && equal_bytes(got.prev, want.prev),
                "%s: elements differ from the scalar loop", what.c_str());
          if (stats_mode) {
            const double tol = sizeof(T) == 4 ? 1e-5 : 1e-12;
            CHECK(std::fabs(stats[0] - dot) <= tol * std::sqrt(gg * dd) && std::fabs(stats[1] - gg) <= tol * gg &&
                      std::fabs(stats[2] - dd) <= tol * dd,
                  "%s: stats %g %g %g vs %g %g %g", what.c_str(), stats[0], stats[1], stats[2], dot, gg, dd);
          }
        }
      }
    }
  }
}

template <typename S, int kDtype>
void check_grad_stats(const KernelTable& table, int64_t n) {
  using T = math::opmath_t<S>;
  std::vector<S> g;
  std::mt19937 rng(5);
  std::normal_distribution<double> normal;
  for (int64_t i = 0; i < n; ++i) {
    g.push_back(from_float<S>(normal(rng) * 3));
  }
  for (int scale = 0; scale < 2; ++scale) {
    GradArgs a{};
    a.grad = g.data();
    a.has_scale = scale != 0;
    a.grad_scale = scale ? 16.0 : 1.0;
    double stats[kGradStats];
    table.grad_stats[kDtype](a, 0, n, stats);
    double sum = 0;
    for (int64_t i = 0; i < n; ++i) {
      T x = math::load(&g[i]);
      if (scale) {
        x = x / T(16);
      }
      sum += static_cast<double>(x * x);
    }
    CHECK(std::fabs(stats[0] - sum) <= 1e-6 * sum && stats[1] == 0.0, "%s grad stats dtype %d: %g vs %g, flag %g",
          table.isa, kDtype, stats[0], sum, stats[1]);
    if (n > 0) {
      // Any single nonfinite element raises the flag, wherever it is.
      for (int64_t where : {int64_t{0}, n / 2, n - 1}) {
        for (double bad : {std::numeric_limits<double>::infinity(), -std::numeric_limits<double>::infinity(),
                           std::numeric_limits<double>::quiet_NaN()}) {
          std::vector<S> h = g;
          h[where] = from_float<S>(bad);
          a.grad = h.data();
          table.grad_stats[kDtype](a, 0, n, stats);
          CHECK(stats[1] == 1.0, "%s nonfinite at %lld not flagged", table.isa, static_cast<long long>(where));
        }
      }
    }
  }
}

void test_kernels() {
  for (Isa isa : {Isa::kDefault, Isa::kAvx2, Isa::kAvx512}) {
    if (!isa_supported(isa)) {
      std::printf("(instruction set %s not supported here: skipped)\n", isa_name(isa));
      continue;
    }
    const KernelTable& t = kernel_table(isa);
    for (int64_t n : {int64_t{0}, int64_t{1}, int64_t{15}, int64_t{64}, int64_t{1000}, int64_t{4099}}) {
      check_adam<float, 0>(t, n);
      check_adam<double, 1>(t, n);
      check_adam<bf16_t, 2>(t, n);
      check_adam<fp16_t, 3>(t, n);
      check_sgd<float, 0>(t, n);
      check_sgd<double, 1>(t, n);
      check_sgd<bf16_t, 2>(t, n);
      check_sgd<fp16_t, 3>(t, n);
      check_grad_stats<float, 0>(t, n);
      check_grad_stats<double, 1>(t, n);
      check_grad_stats<bf16_t, 2>(t, n);
      check_grad_stats<fp16_t, 3>(t, n);
    }
  }
}

AdamArgs amsgrad_update_stats(AdamArgs a) {
  a.mode = Mode::kUpdateStats;
  a.amsgrad = true;
  a.grad.has_scale = true;
  return a;
}

// Every instruction set gives the same bits, elements and statistics alike; and splitting a
// tensor into segments changes no element.
void test_isa_and_segment_invariance() {
  const int64_t n = 5000;
  std::vector<std::vector<float>> results;
  std::vector<std::vector<double>> stats;
  for (Isa isa : {Isa::kDefault, Isa::kAvx2, Isa::kAvx512}) {
    if (!isa_supported(isa)) {
      continue;
    }
    AdamArrays<float> arrays(n, 21);
    const AdamArgs a = amsgrad_update_stats(arrays.args(false));
    std::vector<double> slots(2 * kHypergradStats);
    kernel_table(isa).adam[0](a, 0, 3000, &slots[0]);
    kernel_table(isa).adam[0](a, 3000, n, &slots[3]);
    std::vector<float> all = arrays.p;
    all.insert(all.end(), arrays.m.begin(), arrays.m.end());
    all.insert(all.end(), arrays.v.begin(), arrays.v.end());
    all.insert(all.end(), arrays.vmax.begin(), arrays.vmax.end());
    results.push_back(all);
    stats.push_back(slots);

    AdamArrays<float> whole(n, 21);
    double one[kHypergradStats];
    kernel_table(isa).adam[0](amsgrad_update_stats(whole.args(false)), 0, n, one);
    CHECK(equal_bytes(whole.p, arrays.p) && equal_bytes(whole.m, arrays.m) && equal_bytes(whole.v, arrays.v),
          "%s: segment split changed elements", isa_name(isa));
  }
  for (size_t k = 1; k < results.size(); ++k) {
    CHECK(equal_bytes(results[k], results[0]), "instruction sets disagree on elements (%zu)", k);
    CHECK(equal_bytes(stats[k], stats[0]), "instruction sets disagree on statistics (%zu)", k);
  }
}

// n elements of `dtype` holding `values` rounded to it, as raw bytes (8 per element, enough
// for any dtype).
std::vector<unsigned char> storage_of(Dtype dtype, const std::vector<double>& values) {
  std::vector<unsigned char> bytes(values.size() * 8);
  for (size_t i = 0; i < values.size(); ++i) {
    switch (dtype) {
      case Dtype::kFloat:
        reinterpret_cast<float*>(bytes.data())[i] = from_float<float>(values[i]);
        break;
      case Dtype::kDouble:
        reinterpret_cast<double*>(bytes.data())[i] = values[i];
        break;
      case Dtype::kBFloat16:
        reinterpret_cast<bf16_t*>(bytes.data())[i] = from_float<bf16_t>(values[i]);
        break;
      case Dtype::kHalf:
        reinterpret_cast<fp16_t*>(bytes.data())[i] = from_float<fp16_t>(values[i]);
        break;
    }
  }
  return bytes;
}

// The streams of one call of any variant: parameter, gradient, master copy, four state tensors.
struct VariantArrays {
  std::vector<unsigned char> p, g, master, s0, s1, s2, s3;
  VariantArrays(const Variant& v, int64_t n) {
    std::mt19937 rng(3);
    std::normal_distribution<double> normal;
    auto values = [&](double scale, bool positive) {
      std::vector<double> x(n);
      for (double& e : x) {
        e = positive ? std::fabs(normal(rng)) * scale : normal(rng) * scale;
      }
      return x;
    };
    p = storage_of(v.param, values(1, false));
    g = storage_of(v.param, values(0.1, false));
    master = storage_of(Dtype::kFloat, values(1, false));
    s0 = storage_of(v.state, values(0.01, false));
    s1 = storage_of(v.state, values(1e-3, true));
    s2 = storage_of(v.state, values(1e-3, true));
    s3 = storage_of(v.state, values(0.1, false));
  }
  std::vector<unsigned char> all() const {
    std::vector<unsigned char> out;
    for (const auto* part : {&p, &master, &s0, &s1, &s2, &s3}) {
      out.insert(out.end(), part->begin(), part->end());
    }
    return out;
  }
};

// Every variant's Adam and SGD kernels, in every mode and for every run-time flag, give the
// same bits (elements and statistics) on every instruction set.
void test_every_variant_across_isas() {
  const int64_t n = 1000;
  for (int variant = 0; variant < kNumVariants; ++variant) {
    const Variant& v = kVariants[variant];
    for (int mode = 0; mode < kNumModes; ++mode) {
      if (mode == static_cast<int>(Mode::kStatsOnly) && v.write == ParamWrite::kStochastic) {
        continue;  // the op layer reads stochastic-rounding parameters as stored (variant kNearest)
      }
      for (int flags = 0; flags < 8; ++flags) {
        const bool first = flags & 1, second = (flags & 2) != 0, scale = (flags & 4) != 0;
        std::vector<std::vector<unsigned char>> results;
        std::vector<std::vector<double>> stats;
        for (Isa isa : {Isa::kDefault, Isa::kAvx2, Isa::kAvx512}) {
          if (!isa_supported(isa)) {
            continue;
          }
          for (int algorithm = 0; algorithm < 2; ++algorithm) {
            VariantArrays x(v, n);
            GradArgs grad{};
            grad.grad = x.g.data();
            grad.has_scale = scale;
            grad.grad_scale = scale ? 4.0 : 1.0;
            grad.grad_mult = -0.5;
            grad.weight_decay = 0.01;
            grad.coupled_decay = second;
            ParamArgs param{};
            param.param = x.p.data();
            param.master = reinterpret_cast<float*>(x.master.data());
            param.rounding_stream = 77;
            std::vector<double> slots(kHypergradStats, 0.0);
            if (algorithm == 0) {
              AdamArgs a{};
              a.mode = static_cast<Mode>(mode);
              a.amsgrad = first;
              a.grad = grad;
              a.param = param;
              a.exp_avg = x.s0.data();
              a.exp_avg_sq = x.s1.data();
              a.max_exp_avg_sq = first ? x.s2.data() : x.s1.data();
              a.decay_factor = 1 - 1e-5;
              a.lerp_weight = 0.1;
              a.beta2 = 0.999;
              a.one_minus_beta2 = 1 - 0.999;
              a.eps = 1e-8;
              a.bias_correction2_sqrt = 0.3;
              a.neg_step_size = -1e-3 / 0.2;
              a.prev_direction_scale = 0.25 / 0.15;
              a.prev_direction_eps = 1e-8 * 0.25;
              kernel_table(isa).adam[variant](a, 0, n, slots.data());
            } else {
              SgdArgs a{};
              a.mode = static_cast<Mode>(mode);
              a.momentum_enabled = first;
              a.store_prev = second;
              a.grad = grad;
              a.param = param;
              a.momentum_buffer = x.s0.data();
              a.prev_direction = x.s3.data();
              a.momentum = 0.9;
              a.damp_weight = 0.7;
              a.neg_lr = -0.01;
              a.nesterov = scale;
              kernel_table(isa).sgd[variant](a, 0, n, slots.data());
            }
            results.push_back(x.all());
            stats.push_back(slots);
          }
        }
        for (size_t k = 2; k < results.size(); ++k) {
          CHECK(results[k] == results[k % 2] && stats[k] == stats[k % 2],
                "variant %d mode %d flags %d: instruction set %zu differs (%s)", variant, mode, flags, k / 2,
                k % 2 == 0 ? "adam" : "sgd");
        }
      }
    }
  }
}

// Stochastic rounding in a kernel (bfloat16 parameters, float32 momentum): each element is
// float_to_bf16_stochastic of the scalar update with its offset in the tensor as index,
// whatever the instruction set and however the tensor is cut into segments.
void test_stochastic_rounding_kernel() {
  const int64_t n = 5000;
  const int variant = variant_index(Dtype::kBFloat16, Dtype::kFloat, ParamWrite::kStochastic);
  CHECK(variant >= 0, "no stochastic-rounding variant");
  const uint32_t stream = math::rounding_stream(12345u, 7);
  std::mt19937 rng(5);
  std::normal_distribution<float> normal;
  std::vector<bf16_t> p0, g;
  std::vector<float> b0;
  for (int64_t i = 0; i < n; ++i) {
    p0.push_back(math::float_to_bf16(normal(rng)));
    g.push_back(math::float_to_bf16(normal(rng)));
    b0.push_back(normal(rng) * 0.1f);
  }
  std::vector<bf16_t> want(n);
  int64_t rounded_up = 0;
  for (int64_t i = 0; i < n; ++i) {
    float p = math::bf16_to_float(p0[i]), b = b0[i];
    math::SgdScalars<float> s{0.9f, 1.0f, false, -0.01f};
    math::sgd_update<true>(p, b, math::bf16_to_float(g[i]), s);
    want[i] = math::float_to_bf16_stochastic(p, stream, static_cast<uint64_t>(i));
    rounded_up += want[i].bits != math::float_to_bf16(p).bits;
  }
  CHECK(rounded_up > n / 10, "stochastic rounding equals rounding to nearest too often (%lld differ)",
        static_cast<long long>(rounded_up));
  for (Isa isa : {Isa::kDefault, Isa::kAvx2, Isa::kAvx512}) {
    if (!isa_supported(isa)) {
      continue;
    }
    std::vector<bf16_t> p = p0;
    std::vector<float> b = b0;
    SgdArgs a{};
    a.mode = Mode::kUpdate;
    a.momentum_enabled = true;
    a.grad.grad = g.data();
    a.grad.grad_scale = 1.0;
    a.grad.grad_mult = 1.0;
    a.param.param = p.data();
    a.param.rounding_stream = stream;
    a.momentum_buffer = b.data();
    a.momentum = 0.9;
    a.damp_weight = 1.0;
    a.neg_lr = -0.01;
    const SgdKernel kernel = kernel_table(isa).sgd[variant];
    kernel(a, 0, 1234, nullptr);
    kernel(a, 1234, n, nullptr);
    CHECK(equal_bytes(p, want), "%s: stochastic rounding differs from the scalar stream", isa_name(isa));
  }
}

// --- The multi-tensor work plan -------------------------------------------------------------------

void check_plan(const std::vector<int64_t>& numels, int64_t chunk) {
  const WorkPlan plan = plan_work(numels.data(), static_cast<int64_t>(numels.size()), chunk);
  const int64_t n = static_cast<int64_t>(numels.size());
  CHECK(static_cast<int64_t>(plan.tensor_offsets.size()) == n + 1, "tensor_offsets size");
  CHECK(plan.tensor_offsets.front() == 0 &&
            plan.tensor_offsets.back() == static_cast<int64_t>(plan.segments.size()),
        "tensor_offsets ends");
  for (int64_t i = 0; i < n; ++i) {
    int64_t covered = 0;
    int64_t expected_begin = 0;
    for (int64_t s = plan.tensor_offsets[i]; s < plan.tensor_offsets[i + 1]; ++s) {
      const Segment& seg = plan.segments[s];
      CHECK(seg.tensor == i, "segment %lld belongs to %lld, not %lld", static_cast<long long>(s),
            static_cast<long long>(seg.tensor), static_cast<long long>(i));
      CHECK(seg.begin == expected_begin && seg.begin % chunk == 0, "segment begin %lld",
            static_cast<long long>(seg.begin));
      CHECK(seg.end > seg.begin && seg.end - seg.begin <= chunk, "segment length %lld",
            static_cast<long long>(seg.end - seg.begin));
      covered += seg.end - seg.begin;
      expected_begin = seg.end;
    }
    CHECK(covered == numels[i], "tensor %lld: covered %lld of %lld", static_cast<long long>(i),
          static_cast<long long>(covered), static_cast<long long>(numels[i]));
    const int64_t expected_segments = (numels[i] + chunk - 1) / chunk;
    CHECK(plan.tensor_offsets[i + 1] - plan.tensor_offsets[i] == expected_segments, "tensor %lld: segment count",
          static_cast<long long>(i));
  }
  // Tasks partition the segments in order; every task but the last holds >= chunk elements,
  // and no task holds more than 2 * chunk.
  CHECK(plan.task_offsets.front() == 0 && plan.task_offsets.back() == static_cast<int64_t>(plan.segments.size()),
        "task_offsets ends");
  for (int64_t k = 0; k < plan.num_tasks(); ++k) {
    CHECK(plan.task_offsets[k + 1] > plan.task_offsets[k], "empty task %lld", static_cast<long long>(k));
    int64_t elements = 0;
    for (int64_t s = plan.task_offsets[k]; s < plan.task_offsets[k + 1]; ++s) {
      elements += plan.segments[s].end - plan.segments[s].begin;
    }
    CHECK(elements < 2 * chunk, "task %lld has %lld elements", static_cast<long long>(k),
          static_cast<long long>(elements));
    if (k + 1 < plan.num_tasks()) {
      CHECK(elements >= chunk, "task %lld has only %lld elements", static_cast<long long>(k),
            static_cast<long long>(elements));
    }
  }
}

void test_work_plan() {
  const int64_t chunk = kDefaultChunk;
  check_plan({}, chunk);
  check_plan({0, 0}, chunk);
  check_plan({1, chunk - 1, chunk, chunk + 1, 0, 3 * chunk}, chunk);
  check_plan(std::vector<int64_t>(1000, 1024), chunk);
  check_plan({4194304, 4096, 1024, 7}, chunk);
  check_plan({5, 3, 2}, 2);

  // More than 2^31 elements per tensor and in total: offsets are 64-bit (nothing allocated).
  const int64_t big = (int64_t{1} << 31) + 7;
  const int64_t bigger = 3 * (int64_t{1} << 31) + 12345;
  check_plan({big, 1024, bigger, 0, 1}, chunk);
  const std::vector<int64_t> numels = {big, bigger};
  const WorkPlan plan = plan_work(numels.data(), 2, chunk);
  const Segment& last_of_big = plan.segments[plan.tensor_offsets[1] - 1];
  CHECK(last_of_big.end == big && last_of_big.begin == (big / chunk) * chunk, "last segment of a 2^31+7 tensor");
  CHECK(plan.segments.back().end == bigger && plan.segments.back().tensor == 1, "last segment of the larger tensor");
  int64_t total = 0;
  for (const Segment& s : plan.segments) {
    total += s.end - s.begin;
  }
  CHECK(total == big + bigger, "total elements %lld", static_cast<long long>(total));
  // A huge chunk never overflows.
  check_plan({std::numeric_limits<int64_t>::max() / 2, 3}, std::numeric_limits<int64_t>::max() / 4);

  bool threw = false;
  try {
    const int64_t negative = -1;
    plan_work(&negative, 1, chunk);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  CHECK(threw, "a negative numel is rejected");
}

// --- CUDA launch packing (csrc/cuda/multi_tensor.h) -------------------------------------------

// Packs `numels` into tables of Table's capacity and checks every launch: at most kMaxBlocks
// blocks and kMaxTensors slots, each block's slot filled by set_slot for the right tensor,
// and over all launches every chunk of every tensor exactly once, in tensor-major order,
// with statistics row first_row + chunk equal to its position in that order.
template <typename Table>
void check_packing(const std::vector<int64_t>& numels, int64_t chunk) {
  Table table;
  std::vector<std::pair<int64_t, int64_t>> seen;  // (tensor, chunk) in launch order
  int64_t launches = 0;
  bool slots_ok = true;
  auto set_slot = [&](int slot, int64_t i) {
    table.ptrs[0][slot] = reinterpret_cast<void*>(static_cast<uintptr_t>(i + 1) * 16);
  };
  auto launch = [&](int blocks) {
    ++launches;
    CHECK(blocks > 0 && blocks <= Table::kMaxBlocks, "launch %lld has %d blocks", static_cast<long long>(launches),
          blocks);
    for (int b = 0; b < blocks; ++b) {
      const int slot = table.block_slot[b];
      slots_ok = slots_ok && slot < Table::kMaxTensors;
      const int64_t i = table.index[slot];
      const int64_t c = table.block_chunk[b];
      slots_ok = slots_ok && table.ptrs[0][slot] == reinterpret_cast<void*>(static_cast<uintptr_t>(i + 1) * 16) &&
                 table.numel[slot] == numels[i] && c * chunk < numels[i];
      slots_ok = slots_ok && table.first_row[slot] + c == static_cast<int64_t>(seen.size());
      seen.emplace_back(i, c);
    }
  };
  const int64_t rows =
      alr::cuda::pack_launches(numels.data(), static_cast<int64_t>(numels.size()), chunk, table, set_slot, launch);
  CHECK(slots_ok, "a block's slot does not describe its tensor, or rows are out of order");
  std::vector<std::pair<int64_t, int64_t>> expected;
  int64_t nonempty = 0;
  for (size_t i = 0; i < numels.size(); ++i) {
    nonempty += numels[i] > 0 ? 1 : 0;
    for (int64_t c = 0; c < alr::cuda::num_chunks(numels[i], chunk); ++c) {
      expected.emplace_back(static_cast<int64_t>(i), c);
    }
  }
  CHECK(seen == expected, "chunks launched %zu, expected %zu, or out of order", seen.size(), expected.size());
  CHECK(rows == static_cast<int64_t>(expected.size()), "rows %lld", static_cast<long long>(rows));
  // Launches grow with chunks and (kMaxTensors at a time) with tensors, never one per tensor.
  const int64_t chunks = static_cast<int64_t>(expected.size());
  const int64_t bound = (chunks + Table::kMaxBlocks - 1) / Table::kMaxBlocks +
                        (nonempty + Table::kMaxTensors - 1) / Table::kMaxTensors;
  CHECK(launches <= bound, "%lld launches for %lld chunks of %lld tensors", static_cast<long long>(launches),
        static_cast<long long>(chunks), static_cast<long long>(nonempty));

  // The finishing sum: every tensor (empty ones too) owns exactly its chunks' rows.
  alr::cuda::RowTable<3> ranges;
  int64_t next_tensor = 0;
  int64_t next_row = 0;
  alr::cuda::pack_row_ranges(numels.data(), static_cast<int64_t>(numels.size()), chunk, ranges, [&](int count) {
    CHECK(ranges.first == next_tensor && count > 0 && count <= 3, "row ranges start at %lld",
          static_cast<long long>(ranges.first));
    for (int b = 0; b < count; ++b) {
      const int64_t i = ranges.first + b;
      CHECK(ranges.row_begin[b] == next_row &&
                ranges.row_begin[b + 1] - ranges.row_begin[b] == alr::cuda::num_chunks(numels[i], chunk),
            "rows of tensor %lld", static_cast<long long>(i));
      next_row = ranges.row_begin[b + 1];
    }
    next_tensor += count;
  });
  CHECK(next_tensor == static_cast<int64_t>(numels.size()) && next_row == rows, "row ranges cover %lld tensors",
        static_cast<long long>(next_tensor));
}

void test_cuda_launch_packing() {
  using Small = alr::cuda::TensorTable<2, 3, 4>;  // 3 tensor slots, 4 blocks per launch
  check_packing<Small>({}, 4);
  check_packing<Small>({0, 0}, 4);
  check_packing<Small>({1, 2, 3}, 4);             // three slots used, one launch
  check_packing<Small>({1, 2, 3, 4}, 4);          // the fourth tensor starts a new table
  check_packing<Small>({17}, 4);                  // 5 chunks: split over two launches
  check_packing<Small>({5, 0, 13, 1, 0, 4, 9, 8, 3, 33}, 4);
  check_packing<Small>({4, 4, 4, 4, 4, 4, 4}, 4);  // slots, not blocks, fill first
  check_packing<Small>(std::vector<int64_t>(100, 3), 4);

  // The production tables, with tensors of more than 2^31 elements (planned, never allocated).
  using AdamTable = alr::cuda::TableFor<alr::num_rows(alr::Algorithm::kAdam)>::type;
  using SgdTable = alr::cuda::TableFor<alr::num_rows(alr::Algorithm::kSgd)>::type;
  const int64_t big = (int64_t{1} << 31) + 7;
  check_packing<AdamTable>({big, 1024, 0, 3 * (int64_t{1} << 31) + 12345, 1}, alr::cuda::kChunkSize);
  check_packing<AdamTable>(std::vector<int64_t>(1000, 4096), alr::cuda::kChunkSize);
  check_packing<SgdTable>(std::vector<int64_t>(1000, 4096), alr::cuda::kChunkSize);
  check_packing<alr::cuda::TableFor<1>::type>({70000, 1, 16384, 16385}, alr::cuda::kChunkSize);
  CHECK(AdamTable::kMaxTensors == 28 && SgdTable::kMaxTensors == 32, "Adam table holds %d tensors, SGD %d",
        AdamTable::kMaxTensors, SgdTable::kMaxTensors);

  // The last chunk of a 2^31 + 7 element tensor starts past 2^31 and holds the 7 elements.
  AdamTable table;
  int64_t last_chunk = -1;
  alr::cuda::pack_launches(&big, 1, alr::cuda::kChunkSize, table, [](int, int64_t) {}, [&](int blocks) {
    last_chunk = table.block_chunk[blocks - 1];
  });
  const int64_t begin = last_chunk * alr::cuda::kChunkSize;
  CHECK(begin == (int64_t{1} << 31) && big - begin == 7, "last chunk begins at %lld", static_cast<long long>(begin));

  bool threw = false;
  try {
    const int64_t negative = -1;
    alr::cuda::pack_launches(&negative, 1, 4, table, [](int, int64_t) {}, [](int) {});
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  CHECK(threw, "a negative numel is rejected");
}

}  // namespace

int main() {
  std::printf("alr native tests: default instruction set %s\n", isa_name(default_isa()));
  test_bf16_conversions();
  test_fp16_conversions();
  test_element_math();
  test_kernels();
  test_isa_and_segment_invariance();
  test_every_variant_across_isas();
  test_stochastic_rounding_kernel();
  test_work_plan();
  test_cuda_launch_packing();
  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
