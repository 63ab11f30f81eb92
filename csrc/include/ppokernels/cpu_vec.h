// SIMD specialisation of the generic math (VecOps in common.h) for our VecF (cpu_vecf.h), so
// the per-element functions of csrc/include/ppokernels/<stem>.h run unchanged on SIMD registers
// in the CPU kernels, and the loops, loads and stores every CPU kernel shares. Compiled once per
// ISA level (ppokernels/cpu_isa.h): CPU_CAPABILITY selects the DEFAULT, AVX2 or AVX512 VecF (8,
// 8 or 16 lanes). Everything here is in the per-level namespace ppokernels::CPU_CAPABILITY (the
// VecOps specialisation is on that namespace's VecF): its meaning depends on the lane count, so
// the levels' copies must not be merged by the linker. Threads come from
// torch::stable::parallel_for (torch's own pool, through the stable ABI).
#pragma once
#include "ppokernels/cpu_isa.h"
#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "ppokernels/common.h"
#include "ppokernels/cpu_vecf.h"
#if defined(CPU_CAPABILITY_AVX512)
#include "ppokernels/cpu_vec512.h"  // Vec16
#endif

namespace ppokernels {

template <>
struct VecOps<CPU_CAPABILITY::VecF> {
  using VecF = CPU_CAPABILITY::VecF;
  static VecF abs(VecF x) { return x.abs(); }
  static inline __attribute__((always_inline)) VecF exp(VecF x) { return x.exp(); }
  static VecF log(VecF x) { return x.log(); }
  static VecF log1p(VecF x) { return x.log1p(); }
  static VecF select(VecF mask, VecF a, VecF b) { return VecF::blendv(b, a, mask); }
  static VecF min(VecF a, VecF b) { return CPU_CAPABILITY::minimum(a, b); }
  static VecF max(VecF a, VecF b) { return CPU_CAPABILITY::maximum(a, b); }
  // Two operations (max, then min, x last so that its NaN passes through): maximum / minimum
  // check both operands for NaN, four operations each.
  static VecF clamp(VecF x, VecF lo, VecF hi) { return CPU_CAPABILITY::clamp(x, lo, hi); }
};

namespace CPU_CAPABILITY {

// ---------------------------------------------------------------- thread count from the work
// Every CPU kernel splits its work across threads through parallel_for_work, which gives each
// thread at least kMinWorkPerThread element-operations (for these memory-bound kernels about
// 0.1-0.3 ms on one core). Below it waking a second thread costs more than it saves, and when
// the other cores are busy (another process) the woken thread can wait for a scheduler time
// slice: a 0.2 ms kernel split over 2 threads was measured at 16 ms. Small inputs therefore run
// on the calling thread alone.
constexpr int64_t kMinWorkPerThread = int64_t(1) << 18;

// torch::stable::parallel_for over items [0, n) of `work_per_item` element-operations each (a row of T
// tokens: T; one element: 1; a costlier step counts as several, e.g. gae's scan step or a KL
// estimator's exp: 4): at most n * work_per_item / kMinWorkPerThread threads.
template <typename F>
void parallel_for_work(int64_t n, int64_t work_per_item, const F& f) {
  const int64_t grain = kMinWorkPerThread / std::max<int64_t>(work_per_item, 1);
  torch::stable::parallel_for(0, n, std::max<int64_t>(grain, 1), f);
}

// ---------------------------------------------------------------- loads, stores, lane sums
// Written once for every CPU kernel. V is VecF (SIMD) or a scalar acc type (float / double, for
// the tails and the fp64 path), so one loop body serves both.
constexpr int64_t kVecF = VecF::size();

// The vector type of the masked token loops (row_accumulate, row_map), which run the generic
// per-token math of <stem>.h: Vec16 at the AVX512 level (comparisons in mask registers,
// cpu_vec512.h), VecF elsewhere. Same lane count as VecF.
#if defined(CPU_CAPABILITY_AVX512)
using SimdF = Vec16;
#else
using SimdF = VecF;
#endif
static_assert(SimdF::size() == kVecF, "the loops' vector type has VecF's lanes");

// v = p[0 .. width(V)), converted to float lanes (fp32, bf16, fp16) or to the scalar V.
template <typename V, typename scalar_t>
inline V vload(const scalar_t* p) {
  if constexpr (!std::is_same_v<V, VecF> && !std::is_same_v<V, SimdF>) {
    return V(*p);
  } else if constexpr (!std::is_same_v<V, VecF>) {  // SimdF, a distinct type (AVX512)
    return SimdF(__m512(vload<VecF>(p)));
  } else if constexpr (std::is_same_v<scalar_t, float>) {
    return VecF::loadu(p);
  } else {
    return load_float(p);
  }
}

// The first n < kVecF entries of p, the lanes past them set to `fill` (e.g. -inf, so that tile
// padding adds nothing to a softmax sum).
template <typename scalar_t>
inline VecF vload_partial(const scalar_t* p, int64_t n, float fill) {
  alignas(64) float buf[kVecF];
  for (int64_t i = 0; i < kVecF; ++i) buf[i] = i < n ? static_cast<float>(p[i]) : fill;
  return VecF::loadu(buf);
}

template <typename V, typename scalar_t>
inline void vstore(scalar_t* p, V v) {
  if constexpr (std::is_same_v<V, VecF>) {
    v.store(p);
  } else if constexpr (std::is_same_v<V, SimdF>) {  // distinct from VecF (AVX512); fp32 data
    static_assert(std::is_same_v<scalar_t, float>, "the SIMD token loops run on fp32 only");
    VecF(v.v).store(p);
  } else {
    *p = static_cast<scalar_t>(v);
  }
}

// A bool mask as 1 (set) or 0 values of V: kVecF bytes for VecF (bool bytes are 0 or 1).
template <typename V = VecF>
inline V vload_mask(const bool* p) {
  if constexpr (!std::is_same_v<V, VecF> && !std::is_same_v<V, SimdF>) {
    return V(*p ? 1 : 0);
  } else if constexpr (!std::is_same_v<V, VecF>) {  // SimdF, a distinct type (AVX512)
    return SimdF(__m512(vload_mask<VecF>(p)));
  } else {
#if defined(CPU_CAPABILITY_AVX512)
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return VecF(_mm512_cvtepi32_ps(b));
#elif defined(CPU_CAPABILITY_AVX2)
    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    return VecF(_mm256_cvtepi32_ps(b));
#else
    alignas(64) float buf[kVecF];
    for (int64_t k = 0; k < kVecF; ++k) buf[k] = p[k] ? 1.f : 0.f;
    return VecF::loadu(buf);
#endif
  }
}

// acc + (c ? x : 0) lane-wise, the accumulation of the masked token loops: one masked add with
// Vec16 (the blend with zero and the add are two operations otherwise).
template <typename C, typename V>
inline V vadd_where(C c, V acc, V x) {
  return acc + vselect(c, x, V(0));
}
#if defined(CPU_CAPABILITY_AVX512)
inline Vec16 vadd_where(Mask16 c, Vec16 acc, Vec16 x) {
  return Vec16(_mm512_mask_add_ps(acc.v, c.k, acc.v, x.v));
}
#endif

// True when the kVecF mask bytes at p are all 0 (a chunk of padding: skipped outright).
inline bool mask_chunk_empty(const bool* p) {
  static_assert(kVecF % 8 == 0, "mask chunks are read 8 bytes at a time");
  for (int64_t j = 0; j < kVecF; j += 8) {
    uint64_t bits;
    std::memcpy(&bits, p + j, 8);
    if (bits != 0) return false;
  }
  return true;
}

// Horizontal sum and max of the lanes, in lane order (a fixed order: the same bits every call).
inline float hsum(const VecF& v) {
  alignas(64) float lanes[kVecF];
  v.store(lanes);
  float s = 0.f;
  for (int64_t k = 0; k < kVecF; ++k) s += lanes[k];
  return s;
}
#if defined(CPU_CAPABILITY_AVX512)
inline float hsum(const Vec16& v) { return hsum(VecF(v.v)); }
#endif
inline float hmax(const VecF& v, float init) {
  alignas(64) float lanes[kVecF];
  v.store(lanes);
  // std::max: a NaN lane is passed over
  for (int64_t k = 0; k < kVecF; ++k) init = std::max(init, lanes[k]);
  return init;
}


// ---------------------------------------------------------------- masked row loops
// The token loops of the [B, T] kernels (ppo_loss): one row at a time, kVecF tokens per SIMD step
// for float data, chunks whose mask is all 0 skipped outright (padding costs no work), the tail
// scalar. f is generic over V = VecF or the scalar acc type; f(V(0), t, ...) handles tokens
// [t, t + width(V)) and masks inside.

// out[k] = sum over the valid tokens of the K values f adds into acc[k] (acc_t accumulators,
// the SIMD lanes summed in a fixed order, then the scalar tail; in double at the end).
template <int K, typename scalar_t, typename F>
void row_accumulate(int64_t width, const bool* m, F f, double* out) {
  using acc_t = acc_type<scalar_t>;
  int64_t t = 0;
  for (int k = 0; k < K; ++k) out[k] = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    SimdF acc[K];
    for (int k = 0; k < K; ++k) acc[k] = SimdF(0.f);
    for (; t + kVecF <= width; t += kVecF) {
      if (!mask_chunk_empty(m + t)) f(SimdF(0.f), t, acc);
    }
    for (int k = 0; k < K; ++k) out[k] = hsum(acc[k]);
  }
  acc_t tail[K] = {};
  for (; t < width; ++t) {
    if (m[t]) f(acc_t(0), t, tail);
  }
  for (int k = 0; k < K; ++k) out[k] += static_cast<double>(tail[k]);
}

// Calls f(V(0), t) on chunks with a valid token, z(t, n) on the n masked-out tokens from t (to
// write zeros); a row that is not `active` (e.g. a zero gradient scale) is z(0, width) at once.
template <typename scalar_t, typename F, typename Z>
void row_map(int64_t width, const bool* m, bool active, F f, Z z) {
  using acc_t = acc_type<scalar_t>;
  if (!active) {
    z(0, width);
    return;
  }
  int64_t t = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    for (; t + kVecF <= width; t += kVecF) {
      if (mask_chunk_empty(m + t)) {
        z(t, kVecF);
      } else {
        f(SimdF(0.f), t);
      }
    }
  }
  for (; t < width; ++t) {
    if (m[t]) {
      f(acc_t(0), t);
    } else {
      z(t, 1);
    }
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace ppokernels
