// Per-element math of linear_logprobs (log-probs and entropy from hidden states and the lm_head
// weight), shared by the CPU kernel and any device kernel. The per-row softmax statistics are
// SoftmaxStats of token_logprobs.h; this header adds the backward of one logit and a merge that is safe
// for an empty side.
//
// Forward, per row i with z_j = (h_i . w_j + b_j) / T over the local vocabulary shard:
//   label_logit = z_y (0 when y lies outside the shard),  lse = log sum_j exp(z_j),
//   entropy H = lse - E_p[z]  (= log s - u / s of SoftmaxStats, no cancellation of the max).
// Backward for per-row upstream gradients (g_y, g_lse, g_H) of those three outputs, written with
// a = g_y, b = g_lse, c = -g_H and log p_j = z_j - lse  (so z_j - E_p[z] = log p_j + H):
//   dz_j = a [j == y] + p_j (b + c (log p_j + H)),   dlogit_j = dz_j / T.
// For logprobs = label_logit - lse the caller has a = g_lp, b = -g_lp (+ g_lse), and the target
// column a + b p_y is evaluated as (a + b) + b expm1(log p_y): 1 - p_y without cancellation.
#pragma once
#include "ppokernels/common.h"
#include "ppokernels/token_logprobs.h"

namespace ppokernels {

// dz of a column that is not the label.
template <typename T>
PPK_HOST_DEVICE T linear_logprobs_dz(T logp, T b, T c, T ent) {
  const T p = vexp(logp);
  // p = 0 (a -inf logit: a masked vocabulary entry) gives exactly 0, not 0 * -inf = NaN
  return vselect(p == T(0), T(0), p * (b + c * (logp + ent)));
}

// dz of the label column.
template <typename T>
PPK_HOST_DEVICE T linear_logprobs_dz_label(T logp, T a, T b, T c, T ent) {
  const T p = vexp(logp);
  return (a + b) + b * expm1_poly(logp) + vselect(p == T(0), T(0), p * c * (logp + ent));
}

// softmax_stats_merge where either side may be empty (s == 0, m == -inf): returns the other side
// unchanged (no rescale), so the first vocabulary block's stats are taken exactly.
template <typename T>
PPK_HOST_DEVICE SoftmaxStats<T> linear_logprobs_merge(SoftmaxStats<T> a, SoftmaxStats<T> b) {
  if (!(a.s > T(0))) return b;
  if (!(b.s > T(0))) return a;
  return softmax_stats_merge(a, b);
}

}  // namespace ppokernels
