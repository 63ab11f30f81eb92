// Loss modes of ppo_policy_loss: the per-token forms of the policy losses veRL 0.9.1
// (verl/trainer/ppo/core_algos.py, POLICY_LOSS_REGISTRY) and TRL 1.16
// (trl/trainer/grpo_trainer.py, GRPOTrainer._compute_loss) register, each written once over T
// (float, double or a SIMD vector of floats; common.h) for the CPU loops and the CUDA threads.
// lr = clamp(lp - old, +-logratio_clamp) (no clamp when logratio_clamp <= 0), r = exp(lr),
// A the advantage, w the importance weight, cg = d lr / d (lp - old) (0 where clamped):
//
//   vanilla   PPO clip + dual clip (ppo_policy_loss.h policy_surrogate) of r, times w
//   gspo      the same surrogate of the row's ratio exp(min(s, mp0)), s = masked mean of lr;
//             per-token gradient of exp(lp - sg(lp) + sg(s)) (zero where s > mp0)
//   sapo      L = -w A g(r), g(r) = sigmoid(tau (r - 1)) 4 / tau, tau = mp0 if A > 0 else mp1
//   cispo     L = -w sg(clip(r, mp0, mp1)) A lp
//   gpg       L = -w A lp
//   geo_mean  per row: -Abar exp(sum_t m dt / (n + 1e-8)) sw, dt = min(lr, clip_high) if A > 0,
//             max(lr, -clip_low) if A < 0, 0 if A = 0; Abar = sum m A / (n + 1e-8);
//             sw = exp(sum m log(w + 1e-10) / (n + 1e-8)) (1 without weights)
//   dppo_tv   L = -w A sg(min(r, mp0)) lp valid, valid: p - p_old <= clip_high (A > 0),
//             p - p_old >= -clip_low (A <= 0), p = exp(lp)
//   dppo_kl   as dppo_tv with valid: binary KL(p_old || p) <= clip_high or p <= p_old (A > 0),
//             <= clip_low or p >= p_old (A <= 0)
//   dro       L = -w (lp A - 0.5 mp0 lr^2)
//   vespo     L = -phi A lp, phi = exp(lam + k log_w - lam exp(log_w)) (NaN / inf -> 0),
//             log_w = clamp(sum m lr + sum m clamp(log w, log 1e-8, 20), log 1e-8, 20),
//             (k, lam) = (mp0, max(mp1, 1e-4)) if A >= 0 else (mp2, max(mp3, 1e-4))
//
// Metrics (the two flag slots of the forward): vanilla / gspo: L2 > L1 and dual clip active;
// cispo: r != clip(r) and (r > mp1 and A > 0); geo_mean: lr outside [-clip_low, clip_high] with
// A > 0 and with A < 0; dppo: 1 - valid and (r > mp0) valid; vespo: phi and 0; others 0 and 0.
#pragma once
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "ppokernels/common.h"

namespace ppokernels {

enum class PolicyMode : int {
  kVanilla = 0,
  kGspo = 1,
  kSapo = 2,
  kCispo = 3,
  kGpg = 4,
  kGeoMean = 5,
  kDppoTv = 6,
  kDppoKl = 7,
  kDro = 8,
  kVespo = 9,
};
constexpr int kPolicyModes = 10;
constexpr double kLog1em8 = -18.420680743952367;  // log(1e-8), TRL's VESPO clamp

// Modes whose token loss needs a first pass over the row (sequence-level quantities).
PPK_HOST_DEVICE bool policy_row_pass(PolicyMode m) {
  return m == PolicyMode::kGspo || m == PolicyMode::kGeoMean || m == PolicyMode::kVespo;
}

// GMPO's sign-aware clipped log-ratio, and its derivative (0 where clipped or A = 0; a tie at the
// bound passes, as torch.min of two equal branches).
template <typename T, typename S>
PPK_HOST_DEVICE T geo_logratio(T lr, T adv, S clip_low, S clip_high, T* d) {
  const auto pos = adv > T(0);
  const auto neg = adv < T(0);
  *d = vselect(pos, vselect(lr > T(clip_high), T(0), T(1)),
               vselect(neg, vselect(lr < T(-clip_low), T(0), T(1)), T(0)));
  return vselect(pos, vmin(lr, T(clip_high)), vselect(neg, vmax(lr, T(-clip_low)), T(0)));
}

// DPPO's trust-region flag (1 inside, 0 outside).
template <typename T, typename S>
PPK_HOST_DEVICE T dppo_valid(bool kl, T lp, T old, T adv, S clip_low, S clip_high) {
  const T p = vexp(lp), p_old = vexp(old);
  const auto pos = adv > T(0);
  if (!kl) {
    const T diff = p - p_old;
    return vselect(pos, vselect(diff <= T(clip_high), T(1), T(0)),
                   vselect(diff >= T(-clip_low), T(1), T(0)));
  }
  // 1 - p without cancellation near p = 1
  const T q = T(0) - expm1_poly(lp), q_old = T(0) - expm1_poly(old);
  const T bkl = p_old * (old - lp) + q_old * vlog((q_old + T(1e-8)) / (q + T(1e-8)));
  const T in_pos = vmax(vselect(bkl <= T(clip_high), T(1), T(0)), vselect(p <= p_old, T(1), T(0)));
  const T in_neg = vmax(vselect(bkl <= T(clip_low), T(1), T(0)), vselect(p >= p_old, T(1), T(0)));
  return vselect(pos, in_pos, in_neg);
}

// VESPO's gamma weight phi of a token with advantage A, given the row's log_w.
template <typename T, typename S>
PPK_HOST_DEVICE T vespo_phi(T adv, T log_w, const S* mp) {
  const auto nonneg = adv >= T(0);
  const T k = vselect(nonneg, T(mp[0]), T(mp[2]));
  const T lam = vmax(vselect(nonneg, T(mp[1]), T(mp[3])), T(1e-4));
  const T phi = vexp(lam + k * log_w - lam * vexp(log_w));
  return vselect(phi < T(INFINITY), phi, T(0));  // NaN and inf -> 0 (TRL's nan_to_num)
}

// Token contributions to the row sums of the first pass: gspo s0 = lr; vespo s0 = lr,
// s1 = clamp(log w, log 1e-8, 20); geo_mean s0 = dt, s1 = A, s2 = log(w + 1e-10).
template <typename T, typename S>
PPK_HOST_DEVICE void policy_row_terms(PolicyMode mode, bool has_w, T lr, T adv, T w, S clip_low,
                                      S clip_high, T* s0, T* s1, T* s2) {
  *s1 = T(0);
  *s2 = T(0);
  if (mode == PolicyMode::kGeoMean) {
    T d;
    *s0 = geo_logratio(lr, adv, clip_low, clip_high, &d);
    *s1 = adv;
    if (has_w) *s2 = vlog(w + T(1e-10));
    return;
  }
  *s0 = lr;
  if (mode == PolicyMode::kVespo && has_w) *s1 = vclamp(vlog(w), T(kLog1em8), T(20));
}

// Row values from the first pass's sums (s0, s1, s2) over n valid tokens: ra, rb (saved for the
// backward) and the row's surrogate loss (geo_mean only; the other modes sum token losses).
// gspo: ra = s / n; vespo: ra = log_w; geo_mean: ra = log ratio, rb = d row_loss / d s0.
template <typename S>
PPK_HOST_DEVICE void policy_row_values(PolicyMode mode, bool has_w, S s0, S s1, S s2, S n, S* ra,
                                       S* rb, S* row_loss) {
  *ra = S(0);
  *rb = S(0);
  *row_loss = S(0);
  if (mode == PolicyMode::kGspo) {
    *ra = n > S(0) ? s0 / n : S(0);
  } else if (mode == PolicyMode::kVespo) {
    const S x = s0 + s1;
    *ra = x < S(kLog1em8) ? S(kLog1em8) : (x > S(20) ? S(20) : x);
  } else if (mode == PolicyMode::kGeoMean) {
    const S d = n + S(1e-8);
    *ra = s0 / d;
    const S sw = has_w ? VecOps<S>::exp(s2 / d) : S(1);
    *row_loss = S(0) - (s1 / d) * VecOps<S>::exp(*ra) * sw;
    *rb = *row_loss / d;
  }
}

// The loss modes by name, in the order of LOSS_MODES in ppokernels/losses.py (the index is the
// PolicyMode code), and the length of each mode's loss_params (its spec's PARAMS there).
// tests/ops/test_losses.py reads both tables from this file and fails when they drift from Python's.
constexpr const char* kPolicyModeNames[kPolicyModes] = {
    "vanilla", "gspo", "sapo", "cispo", "gpg", "geo_mean", "dppo_tv", "dppo_kl", "dro", "vespo"};
constexpr int kPolicyModeParams[kPolicyModes] = {3, 4, 2, 2, 0, 2, 3, 3, 1, 4};

// The code of a mode name, or -1.
inline int policy_mode_code(const char* name) {
  for (int i = 0; i < kPolicyModes; ++i) {
    if (std::strcmp(name, kPolicyModeNames[i]) == 0) return i;
  }
  return -1;
}

// The op's loss_params (a spec's PARAMS, checked for length by the caller) as the kernels'
// scalars: clip_low, clip_high, dual (0: none) and mp[0..3] (read as in the table at the top).
//   vanilla   clip_low, clip_high, dual (inf: none)       gspo    the same, then mp0 = seq max
//   sapo      mp0, mp1 = tau_pos, tau_neg                 cispo   mp0, mp1 = lower, upper
//   geo_mean  clip_low, clip_high                         dppo_*  clip_low, clip_high, mp0 = cap
//   dro       mp0 = beta                                  vespo   mp0..3 = k+, lambda+, k-, lambda-
inline void policy_mode_scalars(PolicyMode mode, const double* params, double* clip_low,
                                double* clip_high, double* dual, double* mp) {
  *clip_low = *clip_high = *dual = 0.0;
  for (int k = 0; k < 4; ++k) mp[k] = 0.0;
  switch (mode) {
    case PolicyMode::kVanilla:
    case PolicyMode::kGspo:
      *clip_low = params[0];
      *clip_high = params[1];
      *dual = std::isinf(params[2]) ? 0.0 : params[2];
      if (mode == PolicyMode::kGspo) mp[0] = params[3];
      return;
    case PolicyMode::kGeoMean:
    case PolicyMode::kDppoTv:
    case PolicyMode::kDppoKl:
      *clip_low = params[0];
      *clip_high = params[1];
      if (mode != PolicyMode::kGeoMean) mp[0] = params[2];
      return;
    default:  // sapo, cispo, gpg, dro, vespo: their parameters in order
      for (int k = 0; k < kPolicyModeParams[static_cast<int>(mode)]; ++k) mp[k] = params[k];
  }
}

}  // namespace ppokernels
