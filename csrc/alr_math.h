// Per-element math of the ALR step, shared by the CPU kernels and the CUDA kernels.
//
// Everything here is an inline function on scalars, with no dependency on torch, so a
// kernel for any device can include it: under nvcc the functions are __host__ __device__.
// The formulas and their order of operations are those of alr/reference.py (the normative
// statement of the algorithm), which follows torch.optim:
//
//   gradient   g = grad / S; g = g * mult (mult = ±clip_coef, or ±1); g = fma(p, λ, g) (coupled)
//   Adam       p = p * (1 - α·λ)                      (decoupled; the factor is 1 otherwise)
//              m = lerp(m, g, 1 - β1)                 (torch's two-branch lerp, fused)
//              v = v * β2 + ((1 - β2) * g) * g        (torch's mul_ then addcmul_)
//              v̂ = max(v̂, v)                          (amsgrad)
//              denom = sqrt(v̂) / √bc2 + ε;  p = p + (m * (-α/bc1)) / denom
//   SGD        b = b * μ + g * w                      (w = 1 - dampening, 1 on the first step)
//              d = fma(b, μ, g) (Nesterov) | b (momentum) | g;  p = p + d * (-α)
//   d_{t-1}    Adam: (m / bc1') / (sqrt(v̂) / √bc2' + ε) with the previous step's corrections,
//              rearranged to one division (see adam_prev_direction)
//
// "fma" marks exactly the places where torch's vectorized CPU kernels use a fused
// multiply-add (lerp, add with alpha); everything else is rounded after every operation.
// Translation units that use these functions must therefore not let the compiler contract
// a*b+c into an fma (GCC contracts by default in C++ mode): the CPU kernels compile with
// `#pragma GCC optimize("fp-contract=off")`; a CUDA build needs `--fmad=false` or the
// __fmul_rn/__fadd_rn intrinsics for bit parity with the CPU (not for the tolerances).
//
// Scalars such as bias corrections are not computed here: step_scalars.h computes them once
// per tensor in double, exactly like the reference, and the caller rounds them to opmath
// (float for 16- and 32-bit storage, double for float64).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define ALR_HOST_DEVICE __host__ __device__
#define ALR_FORCEINLINE __forceinline__
#elif defined(__GNUC__) || defined(__clang__)
#define ALR_HOST_DEVICE
#define ALR_FORCEINLINE inline __attribute__((always_inline))
#else
#define ALR_HOST_DEVICE
#define ALR_FORCEINLINE inline
#endif

#define ALR_INLINE ALR_HOST_DEVICE ALR_FORCEINLINE

namespace alr {
namespace math {

// --- Storage types ----------------------------------------------------------------------
// 16-bit storage as raw bits, layout-compatible with c10::BFloat16 / c10::Half (and with
// __nv_bfloat16 / __half): a kernel reinterprets a tensor's data pointer as these.

struct bf16_t {
  uint16_t bits;
};
struct fp16_t {
  uint16_t bits;
};

ALR_INLINE float float_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

ALR_INLINE uint32_t bits_from_float(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

ALR_INLINE double double_from_bits(uint64_t u) {
  double d;
  std::memcpy(&d, &u, sizeof d);
  return d;
}

ALR_INLINE uint64_t bits_from_double(double d) {
  uint64_t u;
  std::memcpy(&u, &d, sizeof u);
  return u;
}

// Branch-free selects (a when c, else b) on bit patterns. GCC's vectorizer rejects a
// conditional whose condition is the same for every element (a flag of the tensor), and
// turns a short-circuit `||` into control flow; a bitwise blend vectorizes in both cases.
ALR_INLINE uint32_t select_bits(bool c, uint32_t a, uint32_t b) {
  const uint32_t mask = 0u - static_cast<uint32_t>(c);
  return (a & mask) | (b & ~mask);
}

ALR_INLINE float select(bool c, float a, float b) {
  return float_from_bits(select_bits(c, bits_from_float(a), bits_from_float(b)));
}

ALR_INLINE double select(bool c, double a, double b) {
  const uint64_t mask = uint64_t{0} - static_cast<uint64_t>(c);
  return double_from_bits((bits_from_double(a) & mask) | (bits_from_double(b) & ~mask));
}

ALR_INLINE float bf16_to_float(bf16_t x) {
  return float_from_bits(static_cast<uint32_t>(x.bits) << 16);
}

// Round to nearest even; every NaN becomes the canonical quiet NaN 0x7FC0 (as c10::BFloat16).
ALR_INLINE bf16_t float_to_bf16(float f) {
  const uint32_t u = bits_from_float(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return bf16_t{static_cast<uint16_t>(select_bits(f != f, 0x7FC0u, rounded))};
}

// Exact for every input (subnormals, infinities, NaN payloads).
ALR_INLINE float fp16_to_float(fp16_t x) {
  const uint32_t h = x.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1Fu;
  const uint32_t mantissa = h & 0x3FFu;
  const uint32_t normal = ((exponent + (127u - 15u)) << 23) | (mantissa << 13);
  const uint32_t inf_nan = 0x7F800000u | (mantissa << 13);
  // A subnormal half is mantissa * 2^-24: exact in float.
  const uint32_t subnormal = bits_from_float(static_cast<float>(static_cast<int32_t>(mantissa)) * 0x1p-24f);
  return float_from_bits(sign | select_bits(exponent == 0x1Fu, inf_nan, select_bits(exponent == 0u, subnormal, normal)));
}

// Round to nearest even; overflow gives ±inf; every NaN becomes ±0x7E00 (as c10::Half).
ALR_INLINE fp16_t float_to_fp16(float f) {
  const uint32_t u = bits_from_float(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7FFFFFFFu;
  // Normal range: drop 13 mantissa bits with round-to-nearest-even, then rebias 127 -> 15.
  const uint32_t normal = ((a + 0xFFFu + ((a >> 13) & 1u)) >> 13) - ((127u - 15u) << 10);
  // Below 2^-14: adding 0.5 (whose ulp is 2^-24) lets the FPU round |f| to a multiple of
  // 2^-24; the low bits are then the half's subnormal mantissa (1024 = the smallest normal).
  const uint32_t subnormal = bits_from_float(float_from_bits(a) + 0.5f) - 0x3F000000u;
  const uint32_t magnitude = select_bits(
      a > 0x7F800000u, 0x7E00u,
      select_bits(a >= 0x477FF000u, 0x7C00u,  // >= 65520 rounds to infinity
                  select_bits(a >= 0x38800000u, normal, subnormal)));
  return fp16_t{static_cast<uint16_t>(sign | magnitude)};
}

// --- Stochastic rounding (alr/reference.py, "Low precision") ---------------------------

// The 32-bit integer hash h of the reference (two multiply-xorshift rounds).
ALR_INLINE uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x21F0AAADu;
  x ^= x >> 15;
  x *= 0x735A2D97u;
  return x ^ (x >> 15);
}

// A tensor's stream of one step: s = h(K ^ h(t)), t the step being taken (its low 32 bits)
// and K the tensor's rounding key (in [0, 2^32)).
ALR_INLINE uint32_t rounding_stream(uint32_t key, uint64_t step) {
  return hash32(key ^ hash32(static_cast<uint32_t>(step)));
}

// f rounded stochastically to bfloat16: the top half of bits(f) + r, with the 16 random bits
// r = h(h(s ^ i_lo) ^ i_hi) of element offset i. Rounds up with probability equal to f's
// distance from the lower neighbour in units of the spacing; NaN rounds to nearest.
ALR_INLINE bf16_t float_to_bf16_stochastic(float f, uint32_t stream, uint64_t index) {
  const uint32_t random =
      hash32(hash32(stream ^ static_cast<uint32_t>(index)) ^ static_cast<uint32_t>(index >> 32)) & 0xFFFFu;
  const uint32_t rounded = (bits_from_float(f) + random) >> 16;
  return bf16_t{static_cast<uint16_t>(select_bits(f != f, 0x7FC0u, rounded))};
}

// opmath: the type the math runs in for a storage type.
template <typename S>
struct OpMath {
  using type = S;
};
template <>
struct OpMath<bf16_t> {
  using type = float;
};
template <>
struct OpMath<fp16_t> {
  using type = float;
};
template <typename S>
using opmath_t = typename OpMath<S>::type;

ALR_INLINE float load(const float* p) { return *p; }
ALR_INLINE double load(const double* p) { return *p; }
ALR_INLINE float load(const bf16_t* p) { return bf16_to_float(*p); }
ALR_INLINE float load(const fp16_t* p) { return fp16_to_float(*p); }

ALR_INLINE void store(float* p, float v) { *p = v; }
ALR_INLINE void store(double* p, double v) { *p = v; }
ALR_INLINE void store(bf16_t* p, float v) { *p = float_to_bf16(v); }
ALR_INLINE void store(fp16_t* p, float v) { *p = float_to_fp16(v); }

// --- Elementary operations --------------------------------------------------------------

ALR_INLINE float fused_multiply_add(float a, float b, float c) { return std::fma(a, b, c); }
ALR_INLINE double fused_multiply_add(double a, double b, double c) { return std::fma(a, b, c); }

// torch.maximum: NaN in either operand propagates.
template <typename T>
ALR_INLINE T maximum(T a, T b) {
  return select((a > b) | (a != a), a, b);
}

// torch.lerp with a scalar weight w, as torch's vectorized CPU kernel computes it:
// |w| < 0.5 ? fma(w, b - a, a) : fma(w - 1, b - a, b). The branch depends on w only, so
// callers resolve it once: coeff = small ? w : w - 1 and from_start = small.
template <typename T>
struct LerpWeight {
  T coeff;
  bool from_start;
};

template <typename T>
ALR_INLINE LerpWeight<T> lerp_weight(T w) {
  const bool small = (w < T(0) ? -w : w) < T(0.5);
  return LerpWeight<T>{small ? w : w - T(1), small};
}

template <typename T>
ALR_INLINE T lerp(T a, T b, LerpWeight<T> w) {
  return fused_multiply_add(w.coeff, b - a, select(w.from_start, a, b));
}

// --- Step 1: the effective gradient -----------------------------------------------------

// grad / scale (GradScaler), times mult (= ±clip coefficient, or ±1 for maximize alone:
// negation and the product commute exactly), plus coupled weight decay as torch's
// g.add(p, alpha=λ). Multiplying by 1 is exact, so mult is always applied. The division is
// a template switch (it costs throughput); coupled_decay is uniform over a tensor, so a
// vectorized loop computes both sides and selects (the fma is cheap next to the loads).
template <bool kScale, typename T>
ALR_INLINE T effective_grad(T grad, T param, T scale, T mult, T weight_decay, bool coupled_decay) {
  T g = grad;
  if (kScale) {
    g = g / scale;
  }
  g = g * mult;
  return select(coupled_decay, fused_multiply_add(param, weight_decay, g), g);
}

// --- Step 2 and 3: Adam ------------------------------------------------------------------

template <typename T>
struct AdamScalars {
  T decay_factor;        // 1 - α·λ for decoupled decay, else 1 (exact no-op)
  LerpWeight<T> beta1;   // lerp weight 1 - β1
  T beta2;               // β2
  T one_minus_beta2;     // 1 - β2
  T eps;                 // ε
  T bias_correction2_sqrt;  // √(1 - β2^t)
  T neg_step_size;       // -α / (1 - β1^t)
};

// The decay and the moments of one Adam update of one element (the part before the
// denominator).
template <typename T>
ALR_INLINE void adam_moments(T& param, T& exp_avg, T& exp_avg_sq, T g, const AdamScalars<T>& s) {
  param = param * s.decay_factor;
  exp_avg = lerp(exp_avg, g, s.beta1);
  exp_avg_sq = exp_avg_sq * s.beta2 + (s.one_minus_beta2 * g) * g;
}

// The rest: param += (m · (-α/bc1)) / (sqrt(v̂) / √bc2 + ε).
template <typename T>
ALR_INLINE void adam_step(T& param, T exp_avg, T second_moment, const AdamScalars<T>& s) {
  const T denom = std::sqrt(second_moment) / s.bias_correction2_sqrt + s.eps;
  param = param + (exp_avg * s.neg_step_size) / denom;
}

// One Adam update of one element; m, v and (amsgrad) vmax are the opmath values before the
// step and receive the values to store. vmax is untouched unless kAmsgrad.
template <bool kAmsgrad, typename T>
ALR_INLINE void adam_update(T& param, T& exp_avg, T& exp_avg_sq, T& max_exp_avg_sq, T g,
                            const AdamScalars<T>& s) {
  adam_moments(param, exp_avg, exp_avg_sq, g, s);
  T second_moment = exp_avg_sq;
  if (kAmsgrad) {
    max_exp_avg_sq = maximum(max_exp_avg_sq, exp_avg_sq);
    second_moment = max_exp_avg_sq;
  }
  adam_step(param, exp_avg, second_moment, s);
}

// adam_update<amsgrad> with amsgrad a run-time flag, for a vectorized loop: the maximum is
// computed either way and selected. Without amsgrad vmax receives the new v, so a caller may
// keep it in v's own storage (load v twice, store it twice). The same bits as adam_update.
template <typename T>
ALR_INLINE void adam_update_select_amsgrad(bool amsgrad, T& param, T& exp_avg, T& exp_avg_sq, T& max_exp_avg_sq,
                                           T g, const AdamScalars<T>& s) {
  adam_moments(param, exp_avg, exp_avg_sq, g, s);
  max_exp_avg_sq = select(amsgrad, maximum(max_exp_avg_sq, exp_avg_sq), exp_avg_sq);
  adam_step(param, exp_avg, max_exp_avg_sq, s);
}

// d_{t-1} for the hypergradient statistics, from the moments before this step:
//   (m / bc1') / (sqrt(v̂) / √bc2' + ε)  ==  (m · scale) / (sqrt(v̂) + shifted_eps)
// with scale = √bc2' / bc1' and shifted_eps = ε·√bc2' (the previous step's corrections,
// t-1 clamped to at least 1), precomputed per tensor. The right-hand form is the
// reference's formula rearranged to one division instead of two: it rounds differently in
// the last bits, which is immaterial for statistics that only steer κ, and it keeps the
// one-pass hypergradient cheaper (division and square root bound the Adam step on CPUs).
// (Newton iterations on multiplies and adds instead of sqrt and division were measured
// slower on Zen 4 with AVX-512.)
template <typename T>
ALR_INLINE T adam_prev_direction(T exp_avg, T second_moment, T scale, T shifted_eps) {
  return (exp_avg * scale) / (std::sqrt(second_moment) + shifted_eps);
}

// --- Step 2 and 3: SGD -------------------------------------------------------------------

template <typename T>
struct SgdScalars {
  T momentum;        // μ
  T damp_weight;     // w: 1 - dampening, or 1 on the first step or without dampening
  bool nesterov;
  T neg_lr;          // -α
};

// One SGD update of one element; returns the direction d_t (stored as the previous
// direction when the hypergradient needs it). buf is untouched unless kMomentum.
template <bool kMomentum, typename T>
ALR_INLINE T sgd_update(T& param, T& momentum_buffer, T g, const SgdScalars<T>& s) {
  T direction = g;
  if (kMomentum) {
    momentum_buffer = momentum_buffer * s.momentum + g * s.damp_weight;
    direction = select(s.nesterov, fused_multiply_add(momentum_buffer, s.momentum, g), momentum_buffer);
  }
  param = param + direction * s.neg_lr;
  return direction;
}

}  // namespace math
}  // namespace alr
