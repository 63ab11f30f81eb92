// Rollout correction: the per-token math of the importance weights between the trainer's and the
// sampler's log-probs, the rejection criteria, and the per-row statistics their metrics are
// reduced from. The specification is ppokernels/reference/rollout_correction.py, which holds the
// same vocabularies (tests/ops/test_rollout_correction.py checks these tables against it).
// Written over T = float, double or a SIMD vector of floats (common.h), for the CPU and CUDA loops.
#pragma once
#include <cmath>
#include <cstring>

#include "ppokernels/common.h"

namespace ppokernels {

// ---------------------------------------------------------------- vocabularies (codes = index)
// level: "token" (per-token ratio), "sequence" (geometric mean of the row's token ratios),
// "sequence_sum" (their product: exp of the summed log-ratio, veRL's and TRL's "sequence").
inline constexpr const char* kRcLevels[] = {"token", "sequence", "sequence_sum"};
// mode: "truncate" (clamp the weight to [L, U], TIS), "mask" (zero outside [L, U], IcePop / MIS)
inline constexpr const char* kRcModes[] = {"truncate", "mask"};
// rejection criterion = "<agg>_<estimator>", code = agg * kRcNumEstimators + estimator
inline constexpr const char* kRcAggs[] = {"token", "seq_sum", "seq_mean", "seq_max"};
inline constexpr const char* kRcEstimators[] = {"k1", "k2", "k3", "binary_kl", "tv"};
constexpr int kRcNumAggs = 4;
constexpr int kRcNumEstimators = 5;
constexpr int kRcMaxCriteria = 16;
// the probability clamp of binary_kl and tv
constexpr double kRcProbEps = 1e-6;

enum RcLevel : int { kRcToken = 0, kRcSequence = 1, kRcSequenceSum = 2 };
enum RcMode : int { kRcTruncate = 0, kRcMask = 1 };
enum RcAgg : int { kRcAggToken = 0, kRcAggSeqSum = 1, kRcAggSeqMean = 2, kRcAggSeqMax = 3 };
enum RcEstimator : int { kRcK1 = 0, kRcK2 = 1, kRcK3 = 2, kRcBinaryKL = 3, kRcTV = 4 };

// Columns of row_stats (reference ROW_STATS), then kRcCritStats per criterion (CRITERION_STATS).
enum RcRowStat : int {
  kRsCount = 0,
  kRsSumLogratio,
  kRsSumLogprobs,
  kRsSumRolloutLogprobs,
  kRsSumK3,
  kRsSumRatioSq,
  kRsSumAbsLogratio,
  kRsMaxAbsLogratio,
  kRsSeqLogratio,
  kRsSeqWeight,
  kRsSumWeights,
  kRsSumWeightsSq,
  kRsMaxWeight,
  kRsMinWeight,
  kRsCountHigh,
  kRsCountLow,
  kRsSumRawWeights,
  kRsCountRejected,
  kRcRowStats  // = 18
};
enum RcCritStat : int {
  kCsValue = 0,
  kCsSum,
  kCsMax,
  kCsMin,
  kCsCountHigh,
  kCsCountLow,
  kCsSumClamped,
  kCsSumClampedSq,
  kCsCountRejected,
  kRcCritStats  // = 9
};

// Everything a kernel needs besides the tensors (host-side parsed, passed by value to CUDA).
struct RcParams {
  int level, mode, n_crit;
  double lower, upper;  // bounds of the weights (-inf / +inf: none)
  double report_low;    // "low" of the metrics: lower, or 1 / upper without a lower bound
  double clamp;         // of the log-ratio before exp (+inf: none)
  int agg[kRcMaxCriteria], est[kRcMaxCriteria];
  double lo[kRcMaxCriteria], hi[kRcMaxCriteria];  // criterion bounds
  double clo[kRcMaxCriteria];                      // std clamp floor: lo, or 0 without one
  int n_cols() const { return kRcRowStats + kRcCritStats * n_crit; }
};

// ---------------------------------------------------------------- per-token math
// The statistic of estimator `est` at a token: xc the clamped log-ratio log pi_train/pi_rollout,
// lp / rlp the trainer's / sampler's log-prob (for binary_kl and tv).
template <typename T>
PPK_HOST_DEVICE T rc_estimator(int est, T xc, T lp, T rlp) {
  switch (est) {
    case kRcK1: return T(0) - xc;
    case kRcK2: return T(0.5) * xc * xc;
    case kRcK3: return expm1_minus_y(xc);  // exp(xc) - 1 - xc without cancellation near 0
    default: break;
  }
  const T eps = T(kRcProbEps), one = T(1);
  const T p = vclamp(vexp(rlp), eps, one - eps);
  const T q = vclamp(vexp(lp), eps, one - eps);
  if (est == kRcTV) return vabs(p - q);
  return p * vlog(p / q) + (one - p) * vlog((one - p) / (one - q));
}

// The weight from the raw ratio: clamp to [lo, hi] (truncate) or keep inside [lo, hi], else 0.
template <typename T, typename S>
PPK_HOST_DEVICE T rc_bound(T raw, int mode, S lo, S hi) {
  if (mode == kRcTruncate) return vclamp(raw, T(lo), T(hi));
  return vselect(raw >= T(lo), vselect(raw <= T(hi), raw, T(0)), T(0));
}

// 1 where lo <= v <= hi, else 0 (NaN gives 0), as T.
template <typename T, typename S>
PPK_HOST_DEVICE T rc_inside(T v, S lo, S hi) {
  return vselect(v >= T(lo), vselect(v <= T(hi), T(1), T(0)), T(0));
}

// ---------------------------------------------------------------- per-row math
// Between and after the sweeps, in the accumulation type A (float or double), the same for the
// CPU and the CUDA kernel.

// s_b: the row's summed log-ratio (level "sequence_sum") or its mean over the n valid tokens
// (the other levels); 0 for an empty row.
template <typename A>
PPK_HOST_DEVICE A rc_row_logratio(int level, A n, A sum_x) {
  return level == kRcSequenceSum ? sum_x : (n > A(0) ? sum_x / n : A(0));
}

// The row's raw weight of the sequence levels, exp(clamp(s_b, -C, C)).
template <typename A>
PPK_HOST_DEVICE A rc_row_raw(A s, double clamp) {
  return vexp(vclamp(s, A(-clamp), A(clamp)));
}

// The row value of a sequence criterion from the sum and the max of its statistic over the row's
// n valid tokens (0 for an empty row).
template <typename A>
PPK_HOST_DEVICE A rc_seq_value(int agg, A n, A sum, A max) {
  if (!(n > A(0))) return A(0);
  return agg == kRcAggSeqSum ? sum : (agg == kRcAggSeqMean ? sum / n : max);
}

// The CRITERION_STATS q[0..8] of sequence criterion c with row value v, which stands for each of
// the row's n valid tokens; returns 1 when the row passes the criterion, else 0.
template <typename A>
PPK_HOST_DEVICE A rc_seq_criterion_stats(const RcParams& p, int c, A v, A n, A* q) {
  const A keep = rc_inside(v, p.lo[c], p.hi[c]);
  const A vc = vclamp(v, A(p.clo[c]), A(p.hi[c]));
  const bool has = n > A(0);
  q[kCsValue] = v;
  q[kCsSum] = n * v;
  q[kCsMax] = has ? v : A(-INFINITY);
  q[kCsMin] = has ? v : A(INFINITY);
  q[kCsCountHigh] = v > A(p.hi[c]) ? n : A(0);
  q[kCsCountLow] = v < A(p.lo[c]) ? n : A(0);
  q[kCsSumClamped] = n * vc;
  q[kCsSumClampedSq] = n * vc * vc;
  q[kCsCountRejected] = keep > A(0) ? A(0) : n;
  return keep;
}

// Accumulators of a token criterion over a row, in this order (the CRITERION_STATS after
// "value"): sum, max, min, count_high, count_low, sum_clamped, sum_clamped_sq, count_rejected.
constexpr int kRcTokAcc = 8;

// The CRITERION_STATS q[0..8] of a token criterion from its accumulators over the row's n valid
// tokens.
template <typename A>
PPK_HOST_DEVICE void rc_token_criterion_stats(A n, const A* s, A* q) {
  q[kCsValue] = n > A(0) ? s[0] / n : A(0);
  for (int k = 0; k < kRcTokAcc; ++k) q[kCsSum + k] = s[k];
}

// ---------------------------------------------------------------- host-side parsing
inline int rc_find(const char* name, const char* const* names, int n) {
  for (int i = 0; i < n; ++i) {
    if (std::strcmp(name, names[i]) == 0) return i;
  }
  return -1;
}
}  // namespace ppokernels
