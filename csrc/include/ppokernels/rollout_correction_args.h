// Host-side setup of the rollout_correction op, written once for the CPU
// (cpu/rollout_correction.cpp) and CUDA (cuda/rollout_correction.cu) front ends: argument
// checks, vocabulary parsing, contiguity and output allocation. The mask is read in its own dtype
// and the rejection mask written in it, so no [B, T] tensor is made besides the two outputs.
#pragma once
#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "ppokernels/rollout_correction.h"
#include "ppokernels/stable.h"

namespace ppokernels {

struct RcArgs {
  Tensor lp, rlp, mask;  // [B, T] contiguous; mask in its own dtype
  Tensor weights;        // [B, T] acc dtype
  Tensor keep;           // [B, T] the mask's dtype
  Tensor row_stats;      // [B, n_cols] acc dtype
  int64_t B = 0, T = 0;
  RcParams p;
};

inline double rc_bound_value(const std::vector<double>& v, size_t i, double none) {
  return std::isnan(v[i]) ? none : v[i];
}

inline RcArgs rollout_correction_args(const Tensor& logprobs, const Tensor& rollout_logprobs,
                                      const Tensor& mask, const std::string& level,
                                      const std::string& mode, const std::vector<double>& bounds,
                                      std::optional<double> logratio_clamp,
                                      const std::vector<int64_t>& criteria,
                                      const std::vector<double>& criteria_bounds) {
  const char* op = "rollout_correction";
  constexpr double inf = std::numeric_limits<double>::infinity();
  RcArgs a;
  PPK_CHECK(logprobs.dim() == 2, op, ": logprobs must be [B, T], got ", shape_str(logprobs));
  PPK_CHECK(same_shape(logprobs, rollout_logprobs), op,
            ": rollout_logprobs must have the shape of logprobs");
  PPK_CHECK(same_shape(logprobs, mask), op, ": mask must have the shape of logprobs");
  PPK_CHECK(logprobs.scalar_type() == rollout_logprobs.scalar_type(), op,
            ": logprobs and rollout_logprobs must have the same dtype");
  PPK_CHECK(same_device(logprobs, rollout_logprobs) && same_device(logprobs, mask), op,
            ": every input must be on the same device");
  RcParams& p = a.p;
  p.level = rc_find(level.c_str(), kRcLevels, 3);
  PPK_CHECK(p.level >= 0, op, ": unknown level '", level, "'");
  p.mode = rc_find(mode.c_str(), kRcModes, 2);
  PPK_CHECK(p.mode >= 0, op, ": unknown mode '", mode, "'");
  // NaN stands for "no bound" in the float[] lists (a schema list cannot hold None)
  PPK_CHECK(bounds.size() == 2, op, ": bounds must be [lower, upper]");
  p.lower = rc_bound_value(bounds, 0, -inf);
  p.upper = rc_bound_value(bounds, 1, inf);
  p.report_low = p.lower > -inf ? p.lower : (p.upper < inf ? 1.0 / p.upper : -inf);
  p.clamp = logratio_clamp.has_value() ? *logratio_clamp : inf;
  PPK_CHECK(criteria.size() <= static_cast<size_t>(kRcMaxCriteria), op, ": at most ",
            kRcMaxCriteria, " criteria");
  PPK_CHECK(criteria_bounds.size() == 2 * criteria.size(), op,
            ": criteria_bounds must hold [lower, upper] per criterion");
  p.n_crit = static_cast<int>(criteria.size());
  for (int c = 0; c < p.n_crit; ++c) {
    PPK_CHECK(criteria[c] >= 0 && criteria[c] < kRcNumAggs * kRcNumEstimators, op,
              ": unknown criterion code ", criteria[c]);
    p.agg[c] = static_cast<int>(criteria[c] / kRcNumEstimators);
    p.est[c] = static_cast<int>(criteria[c] % kRcNumEstimators);
    p.lo[c] = rc_bound_value(criteria_bounds, 2 * c, -inf);
    p.hi[c] = rc_bound_value(criteria_bounds, 2 * c + 1, inf);
    p.clo[c] = p.lo[c] > -inf ? p.lo[c] : 0.0;
  }
  a.lp = as_contiguous(logprobs);
  a.rlp = as_contiguous(rollout_logprobs);
  a.mask = as_contiguous(mask);
  a.B = logprobs.size(0);
  a.T = logprobs.size(1);
  const ScalarType acc = acc_dtype(a.lp);
  a.weights = empty({a.B, a.T}, acc, a.lp);
  a.keep = empty({a.B, a.T}, a.mask.scalar_type(), a.lp);
  a.row_stats = empty({a.B, static_cast<int64_t>(p.n_cols())}, acc, a.lp);
  return a;
}

// Byte width of the mask's dtype and whether it is floating (a float mask is nonzero when any
// bit but the sign is set: -0.0 is 0).
inline int rc_mask_width(ScalarType t) {
  switch (t) {
    case kBool:
    case ScalarType::Byte:
    case ScalarType::Char: return 1;
    case ScalarType::Short:
    case kHalf:
    case kBFloat16: return 2;
    case kInt:
    case kFloat: return 4;
    case kLong:
    case kDouble: return 8;
    default: fail("rollout_correction: mask must be bool, integer or floating, got ", dtype_name(t));
  }
}
inline bool rc_mask_floating(ScalarType t) {
  return t == kHalf || t == kBFloat16 || t == kFloat || t == kDouble;
}
// The bits of 1 in the mask's dtype (what the rejection mask holds for a kept token).
inline uint64_t rc_one_bits(ScalarType t) {
  switch (t) {
    case kHalf: return 0x3C00u;
    case kBFloat16: return 0x3F80u;
    case kFloat: return 0x3F800000u;
    case kDouble: return 0x3FF0000000000000ull;
    default: return 1u;
  }
}

}  // namespace ppokernels
