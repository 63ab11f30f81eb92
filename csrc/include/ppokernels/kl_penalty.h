// Per-token KL estimators (Schulman, "Approximating KL Divergence", 2020), x = logprobs - ref_logprobs.
//   k1 = x            k2 = x^2 / 2            k3 = exp(-x) - 1 + x            abs = |x|
// A "+" estimator (veRL 0.9.1 verl/trainer/ppo/core_algos.py kl_penalty) has the value of the
// named one and the gradient of k2 (straight-through).
// Written branch-free over T (a float, a double or a SIMD vector of floats, see common.h).
#pragma once
#include <cstring>

#include "ppokernels/common.h"

namespace ppokernels {

enum class KLEstimator : int { kK1 = 0, kK2 = 1, kK3 = 2, kAbs = 3 };

// exp(-x) - 1 + x. Near x = 0 the direct form cancels (both terms ~ x, the result ~ x^2 / 2), so
// the shared series of common.h is used there (expm1_minus_y at y = -x).
template <typename T>
PPK_HOST_DEVICE T kl_k3(T x) {
  return expm1_minus_y(T(0) - x);
}

// Value of the estimator (unclamped).
template <typename T>
PPK_HOST_DEVICE T kl_value(T x, KLEstimator est) {
  switch (est) {
    case KLEstimator::kK1: return x;
    case KLEstimator::kK2: return T(0.5) * x * x;
    case KLEstimator::kK3: return kl_k3(x);
    default: return vabs(x);
  }
}

// Value clamped to [-clamp, clamp] (clamp <= 0: none).
template <typename T, typename S>
PPK_HOST_DEVICE T kl_value(T x, KLEstimator est, S clamp) {
  T k = kl_value(x, est);
  if (clamp > S(0)) k = vclamp(k, T(-clamp), T(clamp));
  return k;
}

// d kl / d x. A clamped value has zero gradient (as torch.clamp); the boundary itself passes.
// Straight-through estimators take k2's gradient x, unclamped.
template <typename T, typename S>
PPK_HOST_DEVICE T kl_grad(T x, KLEstimator est, S clamp, bool straight_through) {
  if (straight_through) return x;
  T d;
  switch (est) {
    case KLEstimator::kK1: d = T(1); break;
    case KLEstimator::kK2: d = x; break;
    case KLEstimator::kK3: d = T(0) - expm1_poly(T(0) - x); break;  // 1 - exp(-x)
    default: d = vselect(x > T(0), T(1), vselect(x < T(0), T(-1), x * T(0))); break;  // NaN stays
  }
  if (clamp > S(0)) {
    const T k = kl_value(x, est);
    d = vselect(k < T(-clamp), T(0), vselect(k > T(clamp), T(0), d));
  }
  return d;
}

// The estimators by name, in the order of KL_ESTIMATORS in ppokernels/losses.py (the index is the
// KLEstimator code); tests/ops/test_losses.py fails when the two drift.
constexpr const char* kKLEstimatorNames[] = {"k1", "k2", "k3", "abs"};

// Host-side parser: an estimator name, optionally suffixed by "+". False if unknown.
inline bool parse_kl_estimator(const char* name, KLEstimator* est, bool* straight_through) {
  const size_t n = std::strlen(name);
  *straight_through = n > 0 && name[n - 1] == '+';
  const size_t m = *straight_through ? n - 1 : n;
  for (int i = 0; i < 4; ++i) {
    const char* known = kKLEstimatorNames[i];
    if (std::strlen(known) == m && std::strncmp(name, known, m) == 0) {
      *est = static_cast<KLEstimator>(i);
      return true;
    }
  }
  return false;
}

}  // namespace ppokernels
