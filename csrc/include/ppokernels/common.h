// Shared definitions for the per-element math headers, used by both the CPU and CUDA kernels.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define PPK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PPK_HOST_DEVICE inline
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

// Mask convention of the scans: how masked (mask == 0) tokens enter a recursion.
enum class MaskMode : int {
  kSkip = 0,  // ignored, the recursion jumps over them (veRL, multi-turn aware)
  kZero = 1,  // zeroed, the recursion runs through them (OpenRLHF, TRL)
};

// Generic math over T = float, double or a SIMD vector: VecOps<T> holds the scalar versions;
// cpu_vec.h specialises it for at::vec::Vectorized<float> (a specialisation declared later is
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

// exp(y) - 1 built on exp: a Taylor series for |y| < 0.5, where exp(y) - 1 cancels (error below
// 1e-10 relative), else exp(y) - 1. Branch-free, so it vectorises; cheaper than a SIMD expm1.
template <typename T>
PPK_HOST_DEVICE T expm1_poly(T y) {
  T s = T(1) + y * T(1.0 / 10);
  for (int n = 9; n >= 2; --n) s = T(1) + y * T(1.0 / n) * s;
  return vselect(vabs(y) < T(0.5), y * s, vexp(y) - T(1));
}

}  // namespace ppokernels
