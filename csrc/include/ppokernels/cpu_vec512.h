// The AVX-512 vector type of the token loops (cpu_vec.h's SimdF at that level): 16 fp32 lanes whose
// comparisons give a __mmask16, so that the generic math of <stem>.h (which keeps every comparison
// in an `auto` and consumes it with vselect, & and |) compiles to one compare into a mask register
// and one masked blend. ATen's Vectorized<float> returns comparisons as all-ones float lanes, and
// its select turns them back into a mask; with its NaN-checking minimum / maximum, those
// conversions filled ppo_policy_loss's token loop (perf annotate of its forward).
// Only the per-token math runs on Vec16: the loops' loads and stores are in cpu_vec.h. Included by
// cpu_vec.h at the AVX512 level only.
#pragma once
#include <ATen/cpu/vec/vec.h>
#include <immintrin.h>

#include <type_traits>

#include "ppokernels/common.h"

namespace ppokernels {
namespace CPU_CAPABILITY {

// exp(x) = 2^n e^r with n = round(x log2 e) and r = x - n ln 2 (Cody-Waite: ln 2 in two parts,
// fused multiply-adds, so r is exact to ~1 ulp for any n), |r| <= ln(2)/2, e^r by its degree-7
// Taylor polynomial (truncation below 5.6e-9), scaled by 2^n with vscalefps, which gives inf on
// overflow and 0 or a subnormal on underflow without range checks. x is clamped to [-160, 160]
// first, so +-inf give inf / 0 and NaN stays NaN (max/min return their second operand for NaN).
// Used by both vector types of this level (VecOps<Vectorized<float>>::exp and Vec16).
inline __attribute__((always_inline)) __m512 exp16(__m512 x) {
  static constexpr float kC[8] = {1.f, 1.f, 1.f / 2, 1.f / 6, 1.f / 24, 1.f / 120, 1.f / 720,
                                  1.f / 5040};  // 1 / k!
  __m512 xc = _mm512_max_ps(_mm512_set1_ps(-160.f), x);
  xc = _mm512_min_ps(_mm512_set1_ps(160.f), xc);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.442695041f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), xc);  // ln 2, high bits
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.4286068203094172e-06f), r);      // and the rest
  __m512 p = _mm512_set1_ps(kC[7]);
  for (int k = 6; k >= 0; --k) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kC[k]));
  return _mm512_scalef_ps(p, n);
}

// A comparison of 16 lanes.
struct Mask16 {
  __mmask16 k;
};
inline Mask16 operator&(Mask16 a, Mask16 b) { return {static_cast<__mmask16>(a.k & b.k)}; }
inline Mask16 operator|(Mask16 a, Mask16 b) { return {static_cast<__mmask16>(a.k | b.k)}; }

struct Vec16 {
  __m512 v;
  Vec16() = default;
  // a broadcast, from any arithmetic type (the math writes T(0), T(p.clip_low), T(1e-8))
  template <typename A, std::enable_if_t<std::is_arithmetic_v<A>, int> = 0>
  Vec16(A x) : v(_mm512_set1_ps(static_cast<float>(x))) {}
  explicit Vec16(__m512 x) : v(x) {}
  static constexpr int size() { return 16; }
};

#define PPK_VEC16_ARITH(op, fn) \
  inline Vec16 operator op(Vec16 a, Vec16 b) { return Vec16(fn(a.v, b.v)); }
PPK_VEC16_ARITH(+, _mm512_add_ps)
PPK_VEC16_ARITH(-, _mm512_sub_ps)
PPK_VEC16_ARITH(*, _mm512_mul_ps)
PPK_VEC16_ARITH(/, _mm512_div_ps)
#undef PPK_VEC16_ARITH

// Ordered comparisons (false on NaN) except !=, which is true on NaN, as for C++ floats.
#define PPK_VEC16_CMP(op, pred) \
  inline Mask16 operator op(Vec16 a, Vec16 b) { return {_mm512_cmp_ps_mask(a.v, b.v, pred)}; }
PPK_VEC16_CMP(<, _CMP_LT_OQ)
PPK_VEC16_CMP(<=, _CMP_LE_OQ)
PPK_VEC16_CMP(>, _CMP_GT_OQ)
PPK_VEC16_CMP(>=, _CMP_GE_OQ)
PPK_VEC16_CMP(==, _CMP_EQ_OQ)
PPK_VEC16_CMP(!=, _CMP_NEQ_UQ)
#undef PPK_VEC16_CMP

}  // namespace CPU_CAPABILITY

template <>
struct VecOps<CPU_CAPABILITY::Vec16> {
  using V = CPU_CAPABILITY::Vec16;
  using M = CPU_CAPABILITY::Mask16;
  using VecF = at::vec::Vectorized<float>;
  static V abs(V x) { return V(_mm512_abs_ps(x.v)); }
  static V exp(V x) { return V(CPU_CAPABILITY::exp16(x.v)); }
  static V log(V x) { return V(__m512(VecF(x.v).log())); }  // SLEEF, as ATen's
  static V log1p(V x) { return V(__m512(VecF(x.v).log1p())); }
  static V select(M c, V a, V b) { return V(_mm512_mask_blend_ps(c.k, b.v, a.v)); }
  // NaN-propagating as torch.minimum / maximum: vminps / vmaxps return b when either is NaN,
  // so only a NaN a needs passing on.
  static V min(V a, V b) { return V(_mm512_mask_mov_ps(_mm512_min_ps(a.v, b.v), nan(a), a.v)); }
  static V max(V a, V b) { return V(_mm512_mask_mov_ps(_mm512_max_ps(a.v, b.v), nan(a), a.v)); }
  static __mmask16 nan(V a) { return _mm512_cmp_ps_mask(a.v, a.v, _CMP_UNORD_Q); }
  // min(max(x, lo), hi) with x last in each, so that its NaN passes through (bounds not NaN)
  static V clamp(V x, V lo, V hi) { return V(_mm512_min_ps(hi.v, _mm512_max_ps(lo.v, x.v))); }
};

}  // namespace ppokernels
