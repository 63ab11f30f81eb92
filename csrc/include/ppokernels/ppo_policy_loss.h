// Per-token math of ppo_policy_loss: PPO's clipped surrogate (with asymmetric "clip-higher"
// bounds and dual clip) and the other loss modes (ppo_policy_loss_modes.h); the loss aggregates
// through agg.h. Written branch-free over T (float, double or a SIMD vector of floats;
// common.h), so the CPU SIMD loops, the scalar tails and the CUDA threads run the same code.
//
// Policy, one token (Schulman et al. 2017; dual clip: Ye et al. 2019; veRL 0.9.1
// verl/trainer/ppo/core_algos.py compute_policy_loss_vanilla; docs/semantics.md):
//   L1 = -A r,  L2 = -A clip(r, 1 - clip_low, 1 + clip_high),  Lc = max(L1, L2)
//   dual clip c > 1, A < 0:  L = min(Lc, -A c)
// Gradient with respect to r: L1 wins (or ties, where r is inside the clip range and both terms
// have slope -A) -> -A; L2 strictly wins -> r lies outside the range, slope 0; dual clip active ->
// the constant -A c, slope 0. The flags are veRL's metrics: clipped = L2 > L1, dual = Lc > -A c
// with A < 0.
#pragma once
#include <cstring>

#include "ppokernels/agg.h"
#include "ppokernels/common.h"
#include "ppokernels/kl_penalty.h"
#include "ppokernels/ppo_policy_loss_modes.h"

namespace ppokernels {

// Layout of the per-row partial sums of the policy forward (row_partials[b * kPolicyK + k]).
enum PolicyPartial : int {
  kPN = 0,        // number of valid tokens
  kPLoss = 1,     // sum of the (weighted) surrogate
  kPKL = 2,       // sum of the KL term (unscaled)
  kPEntropy = 3,  // sum of the entropy
  kPClip = 4,     // number of clipped tokens
  kPNegLR = 5,    // sum of -logratio
  kPDual = 6,     // number of tokens where the dual clip is active
  kPolicyK = 7,
};
// Metrics vector of the policy forward: clipfrac, approx_kl, dual_clipfrac, kl, entropy.
constexpr int kPolicyMetrics = 5;
// Per-row values the forward saves for the backward (row_stats[b * 4 + k]): the aggregation
// weight, ra, the surrogate's weight (policy_surrogate_scale), rb (policy_row_values).
constexpr int kPolicyRowStats = 4;

// clamp(x, -c, c); c <= 0 means no clamp.
template <typename T, typename S>
PPK_HOST_DEVICE T clamp_logratio(T x, S c) {
  return c > S(0) ? vclamp(x, T(-c), T(c)) : x;
}

// d clamp_logratio / dx: 1 inside [-c, c] (the boundary passes, as torch.clamp), else 0.
template <typename T, typename S>
PPK_HOST_DEVICE T clamp_logratio_grad(T x, S c) {
  if (!(c > S(0))) return T(1);
  return vselect(x < T(-c), T(0), vselect(x > T(c), T(0), T(1)));
}

// The clipped surrogate of one token from its ratio r and advantage A. Returns L; writes
// dL/dr and veRL's two clip flags (1/0). dual <= 0 means no dual clip.
template <typename T, typename S>
PPK_HOST_DEVICE T policy_surrogate(T ratio, T adv, S clip_low, S clip_high, S dual, T* dl_dratio,
                                   T* clipped, T* dual_active) {
  const T neg_adv = T(0) - adv;
  const T l1 = neg_adv * ratio;
  const T l2 = neg_adv * vclamp(ratio, T(S(1) - clip_low), T(S(1) + clip_high));
  const auto is_clipped = l2 > l1;
  T loss = vmax(l1, l2);
  T d = vselect(is_clipped, T(0), neg_adv);
  *clipped = as_flag<T>(is_clipped);
  if (dual > S(0)) {
    const T l3 = neg_adv * T(dual);
    const auto active = (adv < T(0)) & (loss > l3);
    loss = vselect(active, l3, loss);
    d = vselect(active, T(0), d);
    *dual_active = as_flag<T>(active);
  } else {
    *dual_active = T(0);
  }
  *dl_dratio = d;
  return loss;
}

// Scalars of the policy loss, in the kernel's math type S (double on the CPU, the accumulation type
// on CUDA). Non-positive dual / logratio_clamp / kl_clamp mean "off". mode and mp: the loss mode
// and its parameters (ppo_loss_modes.h).
template <typename S>
struct PolicyParams {
  S clip_low, clip_high, dual, logratio_clamp, kl_coef, kl_clamp, entropy_coef;
  S mp[4];
  KLEstimator est;
  PolicyMode mode;
  bool kl_straight_through, has_ref, has_w;
};

// The parameters in the accumulation type A, for the kernels' inner loops: a local copy of
// scalars the compiler can keep in registers (no double -> float conversion per vector, no reload
// because a store through another pointer might alias them).
template <typename A>
inline PolicyParams<A> policy_params_as(const PolicyParams<double>& p) {
  return PolicyParams<A>{A(p.clip_low),  A(p.clip_high), A(p.dual),
                         A(p.logratio_clamp), A(p.kl_coef), A(p.kl_clamp),
                         A(p.entropy_coef),
                         {A(p.mp[0]), A(p.mp[1]), A(p.mp[2]), A(p.mp[3])},
                         p.est, p.mode, p.kl_straight_through, p.has_ref, p.has_w};
}

// Forward of one valid token: the token's (weighted) surrogate loss (0 for geo_mean, whose loss
// is per row), the (unscaled) KL term and the metric flags. ra / rb: the row's values
// (policy_row_values).
template <typename T, typename S>
PPK_HOST_DEVICE T policy_token_forward(const PolicyParams<S>& p, T lp, T old, T ref, T adv, T w,
                                       T ra, T rb, T* kl, T* clipped, T* dual, T* neg_logratio) {
  const T lr = clamp_logratio(lp - old, p.logratio_clamp);
  *kl = p.has_ref ? kl_value(lp - ref, p.est, p.kl_clamp) : T(0);
  *neg_logratio = T(0) - lr;
  *clipped = T(0);
  *dual = T(0);
  const T r = vexp(lr);
  T d;
  switch (p.mode) {
    case PolicyMode::kVanilla:
      return w * policy_surrogate(r, adv, p.clip_low, p.clip_high, p.dual, &d, clipped, dual);
    case PolicyMode::kGspo:
      return w * policy_surrogate(vexp(vmin(ra, T(p.mp[0]))), adv, p.clip_low, p.clip_high, p.dual,
                                  &d, clipped, dual);
    case PolicyMode::kSapo: {
      const T tau = vselect(adv > T(0), T(p.mp[0]), T(p.mp[1]));
      const T sig = T(1) / (T(1) + vexp(T(0) - tau * (r - T(1))));
      return T(0) - w * (sig * T(4) / tau) * adv;
    }
    case PolicyMode::kCispo: {
      const T c = vclamp(r, T(p.mp[0]), T(p.mp[1]));
      *clipped = vselect(r != c, T(1), T(0));
      *dual = vselect((r > T(p.mp[1])) & (adv > T(0)), T(1), T(0));
      return T(0) - w * c * adv * lp;
    }
    case PolicyMode::kGpg: return T(0) - w * adv * lp;
    case PolicyMode::kGeoMean: {
      const auto out = (lr > T(p.clip_high)) | (lr < T(-p.clip_low));
      *clipped = vselect(out & (adv > T(0)), T(1), T(0));
      *dual = vselect(out & (adv < T(0)), T(1), T(0));
      return T(0);
    }
    case PolicyMode::kDppoTv:
    case PolicyMode::kDppoKl: {
      const T valid = dppo_valid(p.mode == PolicyMode::kDppoKl, lp, old, adv, p.clip_low,
                                 p.clip_high);
      *clipped = T(1) - valid;
      *dual = vselect(r > T(p.mp[0]), valid, T(0));
      return T(0) - w * adv * vmin(r, T(p.mp[0])) * lp * valid;
    }
    case PolicyMode::kDro: return T(0) - w * (lp * adv - T(0.5) * T(p.mp[0]) * lr * lr);
    default: {  // vespo: w enters log_w, not the token loss
      const T phi = vespo_phi(adv, ra, p.mp);
      *clipped = phi;
      return T(0) - phi * adv * lp;
    }
  }
}

// Backward of one valid token: d(token surrogate)/d logprobs before the row's weight (for
// geo_mean: d(row loss)/d logprobs, rb = d row_loss / d s0). *dkl = kl_coef * d KL / d logprobs
// (= -d/d ref_logprobs). Token-level ratios: d r / d lp = r cg. gspo (veRL's gspo):
// r_t = exp(lp_t - sg(lp_t) + sg(s)), so d r_t / d lp_t = r_t (0 where s passed its clamp).
template <typename T, typename S>
PPK_HOST_DEVICE T policy_token_backward(const PolicyParams<S>& p, T lp, T old, T ref, T adv, T w,
                                        T ra, T rb, T* dkl) {
  const T raw = lp - old;
  const T lr = clamp_logratio(raw, p.logratio_clamp);
  const T cg = clamp_logratio_grad(raw, p.logratio_clamp);
  *dkl = p.has_ref ? T(p.kl_coef) * kl_grad(lp - ref, p.est, p.kl_clamp, p.kl_straight_through)
                   : T(0);
  const T r = vexp(lr);
  T d, c, du;
  switch (p.mode) {
    case PolicyMode::kVanilla:
      policy_surrogate(r, adv, p.clip_low, p.clip_high, p.dual, &d, &c, &du);
      return w * d * r * cg;
    case PolicyMode::kGspo: {
      const T rs = vexp(vmin(ra, T(p.mp[0])));
      policy_surrogate(rs, adv, p.clip_low, p.clip_high, p.dual, &d, &c, &du);
      return vselect(ra > T(p.mp[0]), T(0), w * d * rs);
    }
    case PolicyMode::kSapo: {
      const T tau = vselect(adv > T(0), T(p.mp[0]), T(p.mp[1]));
      const T sig = T(1) / (T(1) + vexp(T(0) - tau * (r - T(1))));
      return T(0) - w * adv * T(4) * sig * (T(1) - sig) * r * cg;
    }
    case PolicyMode::kCispo: return T(0) - w * vclamp(r, T(p.mp[0]), T(p.mp[1])) * adv;
    case PolicyMode::kGpg: return T(0) - w * adv;
    case PolicyMode::kGeoMean:
      geo_logratio(lr, adv, p.clip_low, p.clip_high, &d);
      return rb * d * cg;
    case PolicyMode::kDppoTv:
    case PolicyMode::kDppoKl: {
      const T valid = dppo_valid(p.mode == PolicyMode::kDppoKl, lp, old, adv, p.clip_low,
                                 p.clip_high);
      return T(0) - w * adv * vmin(r, T(p.mp[0])) * valid;
    }
    case PolicyMode::kDro: return T(0) - w * (adv - T(p.mp[0]) * lr * cg);
    default: return T(0) - vespo_phi(adv, ra, p.mp) * adv;
  }
}

// Weight of a row's surrogate in the loss: the aggregation weight, except for geo_mean, whose
// per-row loss is averaged over sequences (num_seqs or B; veRL: torch.mean over rows).
PPK_HOST_DEVICE double policy_surrogate_scale(PolicyMode mode, double agg_scale, double num_seqs,
                                              int64_t rows) {
  if (mode != PolicyMode::kGeoMean) return agg_scale;
  const double seqs = num_seqs > 0 ? num_seqs : static_cast<double>(rows);
  return seqs > 0 ? 1.0 / seqs : 0.0;
}

}  // namespace ppokernels
