// The aggregation of a per-token loss into a scalar, shared by the policy and the value loss
// (its Python twin: ppokernels/reference/agg.py agg_loss, the specification, and the
// vocabulary AGG_MODES of ppokernels/losses.py). Every aggregation is a sum over rows of
// row_scale * (the row's sum of token losses), so the forward needs one pass per row plus a
// finalize, and the backward of a token is row_scale times the token's own derivative.
#pragma once
#include <cstdint>
#include <cstring>

#include "ppokernels/common.h"

namespace ppokernels {

// Loss aggregation modes (veRL 0.9.1 verl/trainer/ppo/core_algos.py agg_loss; docs/semantics.md).
enum class AggMode : int {
  kTokenMean = 0,             // sum over valid tokens / (num_tokens or number of valid tokens)
  kTokenSum = 1,              // sum over valid tokens
  kSeqMeanTokenMean = 2,      // per-row masked mean, summed over rows / (num_seqs or B)
  kSeqMeanTokenSum = 3,       // per-row masked sum, summed over rows / (num_seqs or B)
  kSeqMeanTokenSumNorm = 4,   // as kSeqMeanTokenSum, / T as well (Dr.GRPO)
};

// Weight of every valid token of one row in the aggregated loss (the loss is the sum over rows of
// row_scale * row sum). n_row: valid tokens of the row; n_total: valid tokens of the batch;
// num_tokens / num_seqs: global counts (<= 0: use the local ones); rows = B; width = T.
// An empty row, or a batch with no valid token, gets weight 0: loss 0, zero gradient, no NaN.
PPK_HOST_DEVICE double agg_row_scale(AggMode mode, double n_row, double n_total, double num_tokens,
                                     double num_seqs, int64_t rows, int64_t width) {
  const double seqs = num_seqs > 0 ? num_seqs : static_cast<double>(rows);
  switch (mode) {
    case AggMode::kTokenMean: {
      const double d = num_tokens > 0 ? num_tokens : n_total;
      return d > 0 ? 1.0 / d : 0.0;
    }
    case AggMode::kTokenSum: return 1.0;
    case AggMode::kSeqMeanTokenMean: return n_row > 0 ? 1.0 / (n_row * seqs) : 0.0;
    case AggMode::kSeqMeanTokenSum: return seqs > 0 ? 1.0 / seqs : 0.0;
    default: return seqs > 0 && width > 0 ? 1.0 / (seqs * static_cast<double>(width)) : 0.0;
  }
}

// The aggregations by name, in the order of AGG_MODES in ppokernels/losses.py (the index is the
// AggMode code); tests/ops/test_losses.py fails when the two drift.
constexpr const char* kAggModeNames[] = {"token-mean", "token-sum", "seq-mean-token-mean",
                                         "seq-mean-token-sum", "seq-mean-token-sum-norm"};

// Host-side parser; false if unknown.
inline bool parse_agg_mode(const char* name, AggMode* mode) {
  for (int i = 0; i < 5; ++i) {
    if (std::strcmp(name, kAggModeNames[i]) == 0) {
      *mode = static_cast<AggMode>(i);
      return true;
    }
  }
  return false;
}

}  // namespace ppokernels
