// Masked moments and whitening (masked_mean, masked_var, masked_whiten): the scalar math shared
// by the CPU and CUDA kernels.
//
// Masked statistics are two passes over the data (both deterministic two-level reductions):
//   pass A  n = sum m,            S1 = sum m x,             G = sum g   (g: upstream gradient)
//   pass B  S2 = sum m (x - mu)^2,                         H = sum g (x - mu)
// with mu = S1 / n, var = S2 / d, d = n - 1 (unbiased) or n, rstd = 1 / sqrt(var + eps).
// Masked entries (m == 0) contribute nothing to n, S1, S2 (selected away, so even inf/NaN padding
// is ignored); G and H run over all entries because every entry of the whitened output depends on
// mu and rstd. The partial sums of each pass are combined in double, in a fixed order. (The CPU
// kernel runs both passes per fixed chunk while it is in cache and merges the chunks' centred sums
// with Chan et al.'s update: one read of x from memory, the same result.)
//
// Whitening, y = (x - mu) rstd (+ mu when shift_mean is false), has the gradient
//   dx_j = rstd g_j + m_j (cG - cH (x_j - mu)),  cG = (shift ? -rstd : 1 - rstd) G / n,
//                                                cH = rstd^3 H / d
// (d var / d x_j = 2 m_j (x_j - mu) / d; the mean's own derivative term cancels because
// sum m (x - mu) = 0).
#pragma once

#include "ppokernels/common.h"

namespace ppokernels {

// Layout of the double[kNumStats] statistics buffer written by the finalize steps.
enum MaskedStat : int {
  kStatCount = 0,  // n
  kStatMean = 1,   // mu
  kStatSumG = 2,   // G
  kStatVar = 3,    // var (NaN when n == 0, or n == 1 and unbiased)
  kStatRstd = 4,   // 1 / sqrt(var + eps)
  kStatSumGD = 5,  // H
  kStatCoefG = 6,  // cG of the whitening gradient
  kStatCoefH = 7,  // cH of the whitening gradient
  kNumStats = 8,
};

// After pass A: sums = {n, S1, G}.
PPK_HOST_DEVICE void masked_stats_finalize_a(const double* sums, double* stats) {
  stats[kStatCount] = sums[0];
  stats[kStatMean] = sums[1] / sums[0];  // 0 / 0 = NaN for an empty mask, as torch.mean
  stats[kStatSumG] = sums[2];
}

// After pass B: sums = {S2, H}. Needs stats[kStatCount], stats[kStatMean], stats[kStatSumG].
PPK_HOST_DEVICE void masked_stats_finalize_b(const double* sums, double* stats, bool unbiased,
                                             bool shift_mean, double eps) {
  const double n = stats[kStatCount];
  const double d = unbiased ? n - 1.0 : n;
  // torch.var: NaN without enough entries (an empty unbiased mask would otherwise give -0).
  const double var = d > 0.0 ? sums[0] / d : PPK_MATH(nan)("");
  const double rstd = 1.0 / PPK_MATH(sqrt)(var + eps);
  stats[kStatVar] = var;
  stats[kStatRstd] = rstd;
  stats[kStatSumGD] = sums[1];
  stats[kStatCoefG] = (shift_mean ? -rstd : 1.0 - rstd) * stats[kStatSumG] / n;
  stats[kStatCoefH] = rstd * rstd * rstd * sums[1] / d;
}

// Whether an entry feeds the gradient of the statistics (mean, variance) through its whitened
// output: valid entries always; masked ones only when finite. A masked entry holding inf/NaN
// padding keeps its own gradient rstd * g but is never multiplied into the sums (its g * (x - mu)
// would be NaN even for g = 0), so padding cannot poison the valid entries' gradients.
template <typename T>
PPK_HOST_DEVICE bool feeds_stats_grad(bool valid, T x) {
  return valid || x - x == T(0);  // x - x is 0 exactly when x is finite
}

// Whitened value of one entry.
template <typename T>
PPK_HOST_DEVICE T whiten_value(T x, T mean, T rstd, T shift_back) {
  return (x - mean) * rstd + shift_back;  // shift_back = mean, or 0 when shift_mean
}

// Gradient of one entry; m is 1 for valid entries, 0 otherwise. The statistics' part is selected,
// not multiplied by m: a masked entry may hold inf/NaN padding, and 0 * NaN would be NaN.
template <typename T>
PPK_HOST_DEVICE T whiten_grad(T g, T x, T m, T mean, T rstd, T coef_g, T coef_h) {
  return rstd * g + vselect(m > T(0), coef_g - coef_h * (x - mean), T(0));
}

// Coefficients of the masked_moments gradient from the upstream gradient (g_mean, g_var) and the
// count n: coef_mean = g_mean / n, coef_var = 2 g_var / d with d = n - 1 (unbiased) or n. Where
// the statistic is undefined (n = 0, or d = 0: its forward is NaN, a constant) or gets no upstream
// gradient (g = 0, e.g. masked_mean of one entry, whose variance is never used), the coefficient
// is 0, not 0 / 0.
struct MomentsCoefs {
  double mean, var;
};

PPK_HOST_DEVICE MomentsCoefs moments_coefs(double g_mean, double g_var, double n,
                                           bool unbiased) {
  const double d = unbiased ? n - 1.0 : n;
  return {n > 0.0 && g_mean != 0.0 ? g_mean / n : 0.0,
          d > 0.0 && g_var != 0.0 ? 2.0 * g_var / d : 0.0};
}

// Gradient of (mean, var) of masked_moments for one entry: coef_mean + coef_var (x - mu) where
// valid, 0 elsewhere (selected, so NaN padding at masked entries gives 0).
template <typename T>
PPK_HOST_DEVICE T moments_grad(T x, T m, T mean, T coef_mean, T coef_var) {
  return vselect(m > T(0), coef_mean + coef_var * (x - mean), T(0));
}

}  // namespace ppokernels
