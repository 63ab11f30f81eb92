// Group baselines (group_advantages: GRPO, Dr.GRPO, RLOO): the scalar math shared by the CPU and
// CUDA kernels.
//
// A_i = (s_i - center_g) * scale_g per group g of n members with mean mu and unbiased std sigma:
//   grpo, norm_by_std:  center mu, scale 1 / (sigma + eps)   singleton: center 0, scale 1 / (1 + eps)
//   grpo (Dr.GRPO):     center mu, scale 1                   singleton: center 0, scale 1
//   rloo:               center mu, scale n / (n - 1)         singleton: center 0, scale 1
// (singletons as veRL's loop versions: mean 0 and std 1 for GRPO, the raw score for RLOO).
// Gradient: ds_j = scale g_j - coef_g - coef_h (s_j - mu) with, for groups of n >= 2,
//   coef_g = scale sum_i g_i / n,
//   coef_h = scale^2 sum_i g_i (s_i - mu) / ((n - 1) sigma)    (grpo with norm_by_std only;
//            0 where sigma = 0, a subgradient of sigma at its kink),
// and coef_g = coef_h = 0 for singletons.
#pragma once
#include <cstring>

#include "ppokernels/common.h"

namespace ppokernels {

enum class GroupEstimator : int { kGRPO = 0, kRLOO = 1 };

inline bool parse_group_estimator(const char* name, GroupEstimator* est) {
  if (std::strcmp(name, "grpo") == 0) {
    *est = GroupEstimator::kGRPO;
    return true;
  }
  if (std::strcmp(name, "rloo") == 0) {
    *est = GroupEstimator::kRLOO;
    return true;
  }
  return false;
}

struct GroupCoefs {
  double center, scale, mean, sigma;
};

// From the group's count n, sum S1 and centred sum of squares S2 = sum (s - mu)^2.
PPK_HOST_DEVICE GroupCoefs group_coefs(double n, double s1, double s2, GroupEstimator est,
                                       double eps, bool norm_by_std) {
  GroupCoefs c;
  c.mean = s1 / n;
  c.sigma = n > 1.0 ? PPK_MATH(sqrt)(s2 / (n - 1.0)) : 1.0;
  if (n <= 1.0) {
    c.center = 0.0;
    c.scale = (est == GroupEstimator::kGRPO && norm_by_std) ? 1.0 / (1.0 + eps) : 1.0;
  } else {
    c.center = c.mean;
    if (est == GroupEstimator::kRLOO) {
      c.scale = n / (n - 1.0);
    } else {
      c.scale = norm_by_std ? 1.0 / (c.sigma + eps) : 1.0;
    }
  }
  return c;
}

// Backward coefficients from the group's sums of the upstream gradient: sg = sum g,
// sgd = sum g (s - mu). Returns {coef_g, coef_h}.
PPK_HOST_DEVICE void group_grad_coefs(const GroupCoefs& c, double n, double sg, double sgd,
                                      GroupEstimator est, bool norm_by_std, double* coef_g,
                                      double* coef_h) {
  if (n <= 1.0) {
    *coef_g = 0.0;
    *coef_h = 0.0;
    return;
  }
  *coef_g = c.scale * sg / n;
  const bool std_term = est == GroupEstimator::kGRPO && norm_by_std && c.sigma > 0.0;
  *coef_h = std_term ? c.scale * c.scale * sgd / ((n - 1.0) * c.sigma) : 0.0;
}

}  // namespace ppokernels
