// VecF: the fp32 SIMD vector of one ISA level (ppokernels/cpu_isa.h), ours, so that the CPU
// kernels need nothing of ATen (whose at::vec headers refuse to compile against the stable ABI).
//
//   level    lanes  register   exp / log
//   AVX512   16     __m512     exp_avx512 / VecF::log below (polynomials, inline)
//   AVX2     8      __m256     exp_avx2 / VecF::log below (the same polynomials)
//   DEFAULT  8      float[8]   std::exp / std::log per lane (the compiler vectorises the loops)
//
// The interface is the small part of a SIMD vector the kernels use: broadcast, loadu / store,
// size(), + - * /, comparisons that return all-ones lanes (true) or zero lanes (false), & and | of
// such masks, blendv, abs, exp, log, log1p, and the free functions maximum / minimum (NaN
// propagating, as torch.maximum), clamp and fmadd. Conversions from and to bf16 / fp16 storage
// (load_float, store_float) round to nearest even, as torch's .to(dtype) does.
//
// exp, all levels but DEFAULT (Cody-Waite reduction, then a Taylor polynomial):
//   exp(x) = 2^n e^r,  n = round(x log2 e),  r = x - n ln 2 (ln 2 in two parts: r exact to
//   ~1 ulp for any n),  |r| <= ln(2) / 2,  e^r = sum_{k<=7} r^k / k!  (truncation < 5.6e-9)
// log, all levels but DEFAULT (the mantissa reduced to [sqrt(1/2), sqrt(2)), then a minimax
// polynomial for log(1 + f), |f| <= 0.4143; S. L. Moshier's Cephes coefficients for logf):
//   log(x) = e ln 2 + f - f^2 / 2 + f^3 P(f),  x = 2^e (1 + f)
// Both are within 2 ulp of the correctly rounded value over the fp32 range (log1p, from log:
// 3 ulp), the same order as the SLEEF / ATen functions they replace, and give inf, 0, NaN and
// -inf where std:: does (tests/build/test_cpu_vecf.py checks all of it at every level).
#pragma once
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include "ppokernels/cpu_isa.h"

namespace ppokernels {
namespace CPU_CAPABILITY {

// Powers 1 / k! of the exp polynomial, and Cephes logf's P(f), highest power first.
constexpr float kExpC[8] = {1.f, 1.f, 1.f / 2, 1.f / 6, 1.f / 24, 1.f / 120, 1.f / 720,
                            1.f / 5040};
constexpr float kLogP[9] = {7.0376836292e-2f,  -1.1514610310e-1f, 1.1676998740e-1f,
                            -1.2420140846e-1f, 1.4249322787e-1f,  -1.6668057665e-1f,
                            2.0000714765e-1f,  -2.4999993993e-1f, 3.3333331174e-1f};
constexpr float kLn2Hi = 0.693145751953125f, kLn2Lo = 1.4286068203094172e-06f;
constexpr float kLog2e = 1.442695041f;
constexpr float kSqrtHalf = 0.707106781186547524f;

#if defined(CPU_CAPABILITY_AVX512)
// ---------------------------------------------------------------- AVX-512: 16 lanes
using RegF = __m512;
inline RegF reg_set1(float x) { return _mm512_set1_ps(x); }
inline RegF reg_loadu(const float* p) { return _mm512_loadu_ps(p); }
inline void reg_storeu(float* p, RegF v) { _mm512_storeu_ps(p, v); }
inline RegF reg_mask_to_lanes(__mmask16 k) {
  return _mm512_castsi512_ps(_mm512_movm_epi32(k));
}

// exp: x clamped to [-160, 160] first (so +-inf give inf / 0 and NaN stays NaN: max / min
// return their second operand for NaN); vscalefps scales by 2^n with overflow to inf and
// underflow to 0 or a subnormal, without range checks.
inline __attribute__((always_inline)) RegF exp_avx512(RegF x) {
  __m512 xc = _mm512_max_ps(_mm512_set1_ps(-160.f), x);
  xc = _mm512_min_ps(_mm512_set1_ps(160.f), xc);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kExpC[7]);
  for (int k = 6; k >= 0; --k) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpC[k]));
  return _mm512_scalef_ps(p, n);
}

// x = 2^e m with m in [1, 2), by vgetmantps / vgetexpps (subnormals included), for log.
inline void split_mantissa(RegF x, RegF* m, RegF* e) {
  *m = _mm512_getmant_ps(x, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_nan);
  *e = _mm512_getexp_ps(x);
}

#elif defined(CPU_CAPABILITY_AVX2)
// ---------------------------------------------------------------- AVX2: 8 lanes
using RegF = __m256;
inline RegF reg_set1(float x) { return _mm256_set1_ps(x); }
inline RegF reg_loadu(const float* p) { return _mm256_loadu_ps(p); }
inline void reg_storeu(float* p, RegF v) { _mm256_storeu_ps(p, v); }

// 2^n for integer-valued float n in [-126, 127], built in the exponent field.
inline __m256 pow2_avx2(__m256 n) {
  const __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
  return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
}

// exp: x clamped to [-104, 89] (exp(-104) rounds to 0, exp(89) overflows to inf; max / min
// return their second operand for NaN, so NaN stays NaN); 2^n applied in two halves so that
// each stays a normal number while the product underflows or overflows as it should.
inline __attribute__((always_inline)) RegF exp_avx2(RegF x) {
  __m256 xc = _mm256_max_ps(_mm256_set1_ps(-104.f), x);
  xc = _mm256_min_ps(_mm256_set1_ps(89.f), xc);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kExpC[7]);
  for (int k = 6; k >= 0; --k) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpC[k]));
  const __m256 n1 = _mm256_floor_ps(_mm256_mul_ps(n, _mm256_set1_ps(0.5f)));
  const __m256 n2 = _mm256_sub_ps(n, n1);
  const __m256 out = _mm256_mul_ps(_mm256_mul_ps(p, pow2_avx2(n1)), pow2_avx2(n2));
  // the clamp kept NaN in xc, but the integer exponent of a NaN n is garbage
  return _mm256_blendv_ps(out, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

// x = 2^e m with m in [1, 2), from the exponent and mantissa fields, for log; subnormals are
// scaled by 2^23 first.
inline void split_mantissa(RegF x, RegF* m, RegF* e) {
  const __m256 tiny = _mm256_cmp_ps(x, _mm256_set1_ps(1.17549435e-38f), _CMP_LT_OQ);
  const __m256 xs = _mm256_blendv_ps(x, _mm256_mul_ps(x, _mm256_set1_ps(8388608.f)), tiny);
  const __m256i bits = _mm256_castps_si256(xs);
  const __m256 exp = _mm256_cvtepi32_ps(
      _mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(127)));
  *e = _mm256_sub_ps(exp, _mm256_and_ps(tiny, _mm256_set1_ps(23.f)));
  *m = _mm256_castsi256_ps(_mm256_or_si256(
      _mm256_and_si256(bits, _mm256_set1_epi32(0x007fffff)), _mm256_set1_epi32(0x3f800000)));
}
#endif

// ---------------------------------------------------------------- VecF
struct VecF {
  static constexpr int size() {
#if defined(CPU_CAPABILITY_AVX512)
    return 16;
#else
    return 8;
#endif
  }

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  RegF v;
  VecF() = default;
  VecF(float x) : v(reg_set1(x)) {}
  // implicit both ways: the kernels mix VecF with intrinsics (VecF(_mm512_...), __m512(x))
  VecF(RegF x) : v(x) {}
  operator RegF() const { return v; }
  static VecF loadu(const float* p) { return VecF(reg_loadu(p)); }
  void store(float* p) const { reg_storeu(p, v); }
#else
  float v[8];
  VecF() = default;
  VecF(float x) {
    for (float& l : v) l = x;
  }
  static VecF loadu(const float* p) {
    VecF r;
    std::memcpy(r.v, p, sizeof(r.v));
    return r;
  }
  void store(float* p) const { std::memcpy(p, v, sizeof(v)); }
  float operator[](int i) const { return v[i]; }
  float& operator[](int i) { return v[i]; }
#endif

  VecF abs() const;
  VecF exp() const;
  VecF log() const;
  VecF log1p() const;
  // b where the mask's lanes are set, else a (ATen's argument order)
  static VecF blendv(const VecF& a, const VecF& b, const VecF& mask);
};

#if defined(CPU_CAPABILITY_AVX512)
#define PPK_VECF_BINARY(op, fn) \
  inline VecF operator op(VecF a, VecF b) { return VecF(fn(a.v, b.v)); }
PPK_VECF_BINARY(+, _mm512_add_ps)
PPK_VECF_BINARY(-, _mm512_sub_ps)
PPK_VECF_BINARY(*, _mm512_mul_ps)
PPK_VECF_BINARY(/, _mm512_div_ps)
PPK_VECF_BINARY(&, _mm512_and_ps)
PPK_VECF_BINARY(|, _mm512_or_ps)
#undef PPK_VECF_BINARY
// Ordered comparisons (false on NaN) except !=, which is true on NaN, as for C++ floats.
#define PPK_VECF_CMP(op, pred)                                               \
  inline VecF operator op(VecF a, VecF b) {                                  \
    return VecF(reg_mask_to_lanes(_mm512_cmp_ps_mask(a.v, b.v, pred)));      \
  }
PPK_VECF_CMP(<, _CMP_LT_OQ)
PPK_VECF_CMP(<=, _CMP_LE_OQ)
PPK_VECF_CMP(>, _CMP_GT_OQ)
PPK_VECF_CMP(>=, _CMP_GE_OQ)
PPK_VECF_CMP(==, _CMP_EQ_OQ)
PPK_VECF_CMP(!=, _CMP_NEQ_UQ)
#undef PPK_VECF_CMP
inline VecF VecF::abs() const { return VecF(_mm512_abs_ps(v)); }
inline VecF VecF::exp() const { return VecF(exp_avx512(v)); }
inline VecF VecF::blendv(const VecF& a, const VecF& b, const VecF& mask) {
  const __mmask16 k = _mm512_movepi32_mask(_mm512_castps_si512(mask.v));
  return VecF(_mm512_mask_blend_ps(k, a.v, b.v));
}
inline VecF fmadd(VecF a, VecF b, VecF c) { return VecF(_mm512_fmadd_ps(a.v, b.v, c.v)); }
// NaN-propagating, as torch.maximum / minimum: vmaxps / vminps return b when either is NaN,
// so only a NaN in a needs passing on.
inline VecF maximum(VecF a, VecF b) {
  const __mmask16 nan = _mm512_cmp_ps_mask(a.v, a.v, _CMP_UNORD_Q);
  return VecF(_mm512_mask_mov_ps(_mm512_max_ps(a.v, b.v), nan, a.v));
}
inline VecF minimum(VecF a, VecF b) {
  const __mmask16 nan = _mm512_cmp_ps_mask(a.v, a.v, _CMP_UNORD_Q);
  return VecF(_mm512_mask_mov_ps(_mm512_min_ps(a.v, b.v), nan, a.v));
}
// min(max(x, lo), hi) with x last in each, so that its NaN passes through (bounds not NaN)
inline VecF clamp(VecF x, VecF lo, VecF hi) {
  return VecF(_mm512_min_ps(hi.v, _mm512_max_ps(lo.v, x.v)));
}

#elif defined(CPU_CAPABILITY_AVX2)
#define PPK_VECF_BINARY(op, fn) \
  inline VecF operator op(VecF a, VecF b) { return VecF(fn(a.v, b.v)); }
PPK_VECF_BINARY(+, _mm256_add_ps)
PPK_VECF_BINARY(-, _mm256_sub_ps)
PPK_VECF_BINARY(*, _mm256_mul_ps)
PPK_VECF_BINARY(/, _mm256_div_ps)
PPK_VECF_BINARY(&, _mm256_and_ps)
PPK_VECF_BINARY(|, _mm256_or_ps)
#undef PPK_VECF_BINARY
#define PPK_VECF_CMP(op, pred) \
  inline VecF operator op(VecF a, VecF b) { return VecF(_mm256_cmp_ps(a.v, b.v, pred)); }
PPK_VECF_CMP(<, _CMP_LT_OQ)
PPK_VECF_CMP(<=, _CMP_LE_OQ)
PPK_VECF_CMP(>, _CMP_GT_OQ)
PPK_VECF_CMP(>=, _CMP_GE_OQ)
PPK_VECF_CMP(==, _CMP_EQ_OQ)
PPK_VECF_CMP(!=, _CMP_NEQ_UQ)
#undef PPK_VECF_CMP
inline VecF VecF::abs() const {
  return VecF(_mm256_andnot_ps(_mm256_set1_ps(-0.f), v));
}
inline VecF VecF::exp() const { return VecF(exp_avx2(v)); }
inline VecF VecF::blendv(const VecF& a, const VecF& b, const VecF& mask) {
  return VecF(_mm256_blendv_ps(a.v, b.v, mask.v));
}
inline VecF fmadd(VecF a, VecF b, VecF c) { return VecF(_mm256_fmadd_ps(a.v, b.v, c.v)); }
inline VecF maximum(VecF a, VecF b) {
  return VecF(_mm256_blendv_ps(_mm256_max_ps(a.v, b.v), a.v, _mm256_cmp_ps(a.v, a.v, _CMP_UNORD_Q)));
}
inline VecF minimum(VecF a, VecF b) {
  return VecF(_mm256_blendv_ps(_mm256_min_ps(a.v, b.v), a.v, _mm256_cmp_ps(a.v, a.v, _CMP_UNORD_Q)));
}
inline VecF clamp(VecF x, VecF lo, VecF hi) {
  return VecF(_mm256_min_ps(hi.v, _mm256_max_ps(lo.v, x.v)));
}

#else  // DEFAULT: lane loops
template <typename F>
inline VecF lanewise(const VecF& a, const VecF& b, F f) {
  VecF r;
  for (int i = 0; i < 8; ++i) r.v[i] = f(a.v[i], b.v[i]);
  return r;
}
// a mask lane: all bits set (true) or none
inline float mask_lane(bool c) {
  const uint32_t bits = c ? 0xffffffffu : 0u;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline uint32_t lane_bits(float x) {
  uint32_t b;
  std::memcpy(&b, &x, 4);
  return b;
}
inline float bits_lane(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
#define PPK_VECF_BINARY(op) \
  inline VecF operator op(VecF a, VecF b) { return lanewise(a, b, [](float x, float y) { return x op y; }); }
PPK_VECF_BINARY(+)
PPK_VECF_BINARY(-)
PPK_VECF_BINARY(*)
PPK_VECF_BINARY(/)
#undef PPK_VECF_BINARY
#define PPK_VECF_CMP(op)                                                                      \
  inline VecF operator op(VecF a, VecF b) {                                                   \
    return lanewise(a, b, [](float x, float y) { return mask_lane(x op y); });               \
  }
PPK_VECF_CMP(<)
PPK_VECF_CMP(<=)
PPK_VECF_CMP(>)
PPK_VECF_CMP(>=)
PPK_VECF_CMP(==)
PPK_VECF_CMP(!=)
#undef PPK_VECF_CMP
inline VecF operator&(VecF a, VecF b) {
  return lanewise(a, b, [](float x, float y) { return bits_lane(lane_bits(x) & lane_bits(y)); });
}
inline VecF operator|(VecF a, VecF b) {
  return lanewise(a, b, [](float x, float y) { return bits_lane(lane_bits(x) | lane_bits(y)); });
}
inline VecF VecF::abs() const {
  return lanewise(*this, *this, [](float x, float) { return std::fabs(x); });
}
inline VecF VecF::exp() const {
  return lanewise(*this, *this, [](float x, float) { return std::exp(x); });
}
inline VecF VecF::log() const {
  return lanewise(*this, *this, [](float x, float) { return std::log(x); });
}
inline VecF VecF::blendv(const VecF& a, const VecF& b, const VecF& mask) {
  VecF r;
  for (int i = 0; i < 8; ++i) r.v[i] = lane_bits(mask.v[i]) != 0 ? b.v[i] : a.v[i];
  return r;
}
inline VecF fmadd(VecF a, VecF b, VecF c) { return a * b + c; }
inline VecF maximum(VecF a, VecF b) {
  return lanewise(a, b, [](float x, float y) { return (x > y || x != x) ? x : y; });
}
inline VecF minimum(VecF a, VecF b) {
  return lanewise(a, b, [](float x, float y) { return (x < y || x != x) ? x : y; });
}
inline VecF clamp(VecF x, VecF lo, VecF hi) {
  VecF r;
  for (int i = 0; i < 8; ++i) {
    const float m = x.v[i] < lo.v[i] ? lo.v[i] : x.v[i];
    r.v[i] = m > hi.v[i] ? hi.v[i] : m;
  }
  return r;
}
#endif

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// log, written once over VecF for both SIMD levels: x = 2^e m (split_mantissa), m >= sqrt(2)
// halved (e + 1) so that f = m - 1 lies in [sqrt(1/2) - 1, sqrt(2) - 1), the polynomial, then
// the special values: 0 -> -inf, +inf -> +inf, x < 0 and NaN -> NaN.
inline VecF VecF::log() const {
  const VecF x = *this;
  RegF mr, er;
  split_mantissa(x.v, &mr, &er);
  VecF m(mr), e(er);
  const VecF big = m >= VecF(2.f * kSqrtHalf);
  m = blendv(m, m * VecF(0.5f), big);
  e = e + (big & VecF(1.f));
  const VecF f = m - VecF(1.f);
  const VecF z = f * f;
  VecF p(kLogP[0]);
  for (int k = 1; k < 9; ++k) p = fmadd(p, f, VecF(kLogP[k]));
  VecF y = p * f * z;
  y = fmadd(e, VecF(-2.12194440e-4f), y);
  y = fmadd(z, VecF(-0.5f), y);
  VecF out = fmadd(e, VecF(0.693359375f), f + y);
  out = blendv(out, VecF(-INFINITY), x == VecF(0.f));
  out = blendv(out, x, x == VecF(INFINITY));
  return blendv(out, VecF(NAN), (x < VecF(0.f)) | (x != x));
}
#endif

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// log(1 + x) from log(u), u = 1 + x, corrected by x / (u - 1) for the rounding of u
// (D. Goldberg, "What every computer scientist should know about floating-point arithmetic",
// 1991, theorem 4): within 3 ulp (tests/build/cpp/vecf_math.cpp), and x itself where u rounds to 1.
inline VecF VecF::log1p() const {
  const VecF x = *this;
  const VecF u = x + VecF(1.f);
  const VecF d = u - VecF(1.f);
  const VecF corrected = u.log() * (x / d);
  // d == 0: u rounded to 1; u == inf: x / d is inf / inf
  const VecF r = blendv(corrected, x, d == VecF(0.f));
  return blendv(r, u.log(), u == VecF(INFINITY));
}
#else
inline VecF VecF::log1p() const {
  return lanewise(*this, *this, [](float x, float) { return std::log1p(x); });
}
#endif

// ---------------------------------------------------------------- bf16 / fp16 storage
// Bits of the half types: torch's c10::BFloat16 / c10::Half keep them in a uint16_t `x`.
// load_float: kVecF values at p as fp32 lanes. store_float: rounded to nearest even.
template <typename H>
inline VecF load_float(const H* p) {
  static_assert(sizeof(H) == 2, "bf16 or fp16 storage");
  constexpr bool kBf16 = std::is_same_v<H, c10::BFloat16>;
#if defined(CPU_CAPABILITY_AVX512)
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  if constexpr (kBf16) {
    return VecF(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
  } else {
    return VecF(_mm512_cvtph_ps(h));
  }
#elif defined(CPU_CAPABILITY_AVX2)
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if constexpr (kBf16) {
    return VecF(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
  } else {
    return VecF(_mm256_cvtph_ps(h));
  }
#else
  VecF r;
  for (int i = 0; i < 8; ++i) r.v[i] = static_cast<float>(p[i]);
  return r;
#endif
}

template <typename H>
inline void store_float(H* p, VecF v) {
  static_assert(sizeof(H) == 2, "bf16 or fp16 storage");
#if defined(CPU_CAPABILITY_AVX512)
  __m256i h;
  if constexpr (std::is_same_v<H, c10::BFloat16>) {
    // round to nearest even: add 0x7fff plus the lowest kept bit, keep the high 16 bits;
    // NaN becomes the quiet NaN 0x7fc0
    const __m512i bits = _mm512_castps_si512(v.v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(
        _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v.v, v.v, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc0));
    h = _mm512_cvtepi32_epi16(r);
  } else {
    h = _mm512_cvtps_ph(v.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
#elif defined(CPU_CAPABILITY_AVX2)
  __m128i h;
  if constexpr (std::is_same_v<H, c10::BFloat16>) {
    const __m256i bits = _mm256_castps_si256(v.v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(
        _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    const __m256 nan = _mm256_cmp_ps(v.v, v.v, _CMP_UNORD_Q);
    r = _mm256_castps_si256(_mm256_blendv_ps(
        _mm256_castsi256_ps(r), _mm256_castsi256_ps(_mm256_set1_epi32(0x7fc0)), nan));
    // 8 x int32 (< 2^16) -> 8 x uint16: pack within the 128-bit halves, then join the halves
    const __m256i packed = _mm256_packus_epi32(r, r);
    h = _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
  } else {
    h = _mm256_cvtps_ph(v.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
#else
  for (int i = 0; i < 8; ++i) p[i] = static_cast<H>(v.v[i]);
#endif
}

}  // namespace CPU_CAPABILITY
}  // namespace ppokernels
