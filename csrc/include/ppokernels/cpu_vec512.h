// The AVX-512 vector type of the token loops (cpu_vec.h's SimdF at that level): 16 fp32 lanes whose
// comparisons give a __mmask16, so that the generic math of <stem>.h (which keeps every comparison
// in an `auto` and consumes it with vselect, & and |) compiles to one compare into a mask register
// and one masked blend. VecF (cpu_vecf.h) returns comparisons as all-ones float lanes, as ATen's
// Vectorized<float> did, and its select turns them back into a mask; with its NaN-checking minimum / maximum, those
// conversions filled ppo_policy_loss's token loop (perf annotate of its forward).
// Only the per-token math runs on Vec16: the loops' loads and stores are in cpu_vec.h. Included by
// cpu_vec.h at the AVX512 level only.
#pragma once
#include <immintrin.h>

#include <type_traits>

#include "ppokernels/common.h"
#include "ppokernels/cpu_vecf.h"

namespace ppokernels {
namespace CPU_CAPABILITY {

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
  using VecF = CPU_CAPABILITY::VecF;
  static V abs(V x) { return V(_mm512_abs_ps(x.v)); }
  static V exp(V x) { return V(CPU_CAPABILITY::exp_avx512(x.v)); }
  static V log(V x) { return V(__m512(VecF(x.v).log())); }  // cpu_vecf.h
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
