// Shared definitions for the per-element math headers, used by both the CPU and CUDA kernels.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define PPK_HOST_DEVICE __host__ __device__ __forceinline__
#else
// Forced inline on the host too: the per-token functions take several outputs by pointer, and an
// out-of-line call per SIMD vector spills them to memory (measured: ppo_policy_loss's surrogate
// and exp were separate calls, a large part of its forward).
#define PPK_HOST_DEVICE inline __attribute__((always_inline))
#endif

#include <cmath>
#include <cstdint>

// Math functions callable from both host and device code: std:: overloads on the host, CUDA's
// global float/double overloads on the device.
#if defined(__CUDA_ARCH__)
#define PPK_MATH(fn) ::fn
#else
#define PPK_MATH(fn) std::fn
#endif

namespace ppokernels {

// Accumulation type of a storage type: fp64 for fp64, fp32 for fp32 and the half types (bf16,
// fp16 on the host; __nv_bfloat16, __half on the device).
template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };
template <typename T> using acc_type = typename AccType<T>::type;

// Mask convention of the scans: how masked (mask == 0) tokens enter a recursion.
enum class MaskMode : int {
  kSkip = 0,  // ignored, the recursion jumps over them (veRL, multi-turn aware)
  kZero = 1,  // zeroed, the recursion runs through them (OpenRLHF, TRL)
};

// Generic math over T = float, double or a SIMD vector: VecOps<T> holds the scalar versions;
// cpu_vec.h specialises it for the CPU's VecF (cpu_vecf.h) (a specialisation declared later is
// still found when a template is instantiated, unlike a later overload). The per-element
// functions of <stem>.h are written with these, branch-free where it matters, so one definition
// serves CUDA threads, scalar CPU loops and SIMD CPU loops.
template <typename T>
struct VecOps {
  static PPK_HOST_DEVICE T abs(T x) { return PPK_MATH(fabs)(x); }
  static PPK_HOST_DEVICE T exp(T x) { return PPK_MATH(exp)(x); }
  static PPK_HOST_DEVICE T log(T x) { return PPK_MATH(log)(x); }
  static PPK_HOST_DEVICE T log1p(T x) { return PPK_MATH(log1p)(x); }
  static PPK_HOST_DEVICE T select(bool c, T a, T b) { return c ? a : b; }
  // NaN-propagating, as torch.minimum / torch.maximum / torch.clamp.
  static PPK_HOST_DEVICE T min(T a, T b) { return (a < b || a != a) ? a : b; }
  static PPK_HOST_DEVICE T max(T a, T b) { return (a > b || a != a) ? a : b; }
  // min(max(x, lo), hi) for bounds that are not NaN: NaN in x propagates and lo > hi gives hi,
  // as torch.clamp.
  static PPK_HOST_DEVICE T clamp(T x, T lo, T hi) {
    const T m = x < lo ? lo : x;
    return m > hi ? hi : m;
  }
};

template <typename T> PPK_HOST_DEVICE T vabs(T x) { return VecOps<T>::abs(x); }
template <typename T> PPK_HOST_DEVICE T vexp(T x) { return VecOps<T>::exp(x); }
template <typename T> PPK_HOST_DEVICE T vlog(T x) { return VecOps<T>::log(x); }
template <typename T> PPK_HOST_DEVICE T vlog1p(T x) { return VecOps<T>::log1p(x); }
template <typename C, typename T> PPK_HOST_DEVICE T vselect(C c, T a, T b) {
  return VecOps<T>::select(c, a, b);
}
template <typename T> PPK_HOST_DEVICE T vmin(T a, T b) { return VecOps<T>::min(a, b); }
template <typename T> PPK_HOST_DEVICE T vmax(T a, T b) { return VecOps<T>::max(a, b); }
template <typename T> PPK_HOST_DEVICE T vclamp(T x, T lo, T hi) {
  return VecOps<T>::clamp(x, lo, hi);
}
// 1 where c holds, else 0 (c a bool, or a SIMD comparison mask).
template <typename T, typename C>
PPK_HOST_DEVICE T as_flag(C c) {
  return vselect(c, T(1), T(0));
}

// ---------------------------------------------------------------- the exp(y) - 1 series
// exp(y) - 1 cancels near y = 0 (and exp(-x) - 1 + x, the k3 KL estimator, cancels twice), so
// both are evaluated there from one truncated Taylor series, written once:
//   exp(y) - 1     = y (1 + (y / 2) tail(y))
//   exp(y) - 1 - y = y^2 (1 / 2) tail(y),     tail(y) = 1 + y/3 (1 + y/4 (1 + ... (1 + y/N)))
// for |y| < kExpSeriesBound, and from exp beyond it. N = ExpSeries<T>::kTerms is the last power
// kept; the truncation error of the sum, relative to its value, is below
//   |y|^N / (N + 1)!          for exp(y) - 1       (N = 10, |y| < 0.5: 2.5e-11)
//   2 |y|^(N - 1) / (N + 1)!  for exp(y) - 1 - y   (N = 10, |y| < 0.5: 9.8e-11)
// so N = 10 is far inside fp32's rounding (2^-24 = 6.0e-8), and fp64 takes N = 15 (1.5e-18 and
// 5.8e-18, inside 2^-53 = 1.1e-16). Outside the bound exp(y) - 1 loses at most a few ulp (the
// factor exp(y) / |exp(y) - 1| <= 2.6 at |y| = 0.5). Branch-free (both sides are computed), so it
// vectorises; cheaper than a SIMD expm1. The Triton kernels (ppokernels/triton/_common.py) use
// the same N, bound and Horner order, term for term.
constexpr double kExpSeriesBound = 0.5;
template <typename T> struct ExpSeries { static constexpr int kTerms = 10; };  // fp32, SIMD fp32
template <> struct ExpSeries<double> { static constexpr int kTerms = 15; };

// tail(y) above, Horner from the highest power down; multiplies by 1/n (no divisions).
template <typename T>
PPK_HOST_DEVICE T exp_series_tail(T y) {
  constexpr int N = ExpSeries<T>::kTerms;
  T s = T(1) + y * T(1.0 / N);
#pragma unroll
  for (int n = N - 1; n >= 3; --n) s = T(1) + y * T(1.0 / n) * s;
  return s;
}

// exp(y) - 1.
template <typename T>
PPK_HOST_DEVICE T expm1_poly(T y) {
  const T s = T(1) + y * T(1.0 / 2) * exp_series_tail(y);
  return vselect(vabs(y) < T(kExpSeriesBound), y * s, vexp(y) - T(1));
}

// exp(y) - 1 - y.
template <typename T>
PPK_HOST_DEVICE T expm1_minus_y(T y) {
  return vselect(vabs(y) < T(kExpSeriesBound), y * y * (T(0.5) * exp_series_tail(y)),
                 vexp(y) - T(1) - y);
}

}  // namespace ppokernels
