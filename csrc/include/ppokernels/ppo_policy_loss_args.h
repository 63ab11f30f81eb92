// Host-side setup of ppo_policy_loss and its backward, written once for the CPU
// (cpu/ppo_policy_loss.cpp) and CUDA (cuda/ppo_policy_loss.cu) front ends: argument checks, mode
// parsing (loss_mode, kl_estimator; agg in agg_args.h), contiguity and the gradient outputs.
// Those files keep only the dtype dispatch, the launch and the registration.
#pragma once
#include <optional>
#include <string>
#include <vector>

#include "ppokernels/agg_args.h"
#include "ppokernels/ppo_policy_loss.h"
#include "ppokernels/stable.h"

namespace ppokernels {

struct PolicyArgs {
  int64_t B, T;
  Tensor lp, old, ref, ent;  // [B, T], input dtype; ref / ent undefined when not given
  Tensor adv, w;             // [B, T] or [B] (adv_row / w_row), accumulation dtype
  Tensor mask;               // [B, T] bool
  bool adv_row = false, w_row = false;
  PolicyParams<double> p;
};

inline PolicyArgs policy_args(const char* op, const Tensor& logprobs,
                              const Tensor& old_logprobs, const Tensor& advantages,
                              const Tensor& mask, const std::optional<Tensor>& ref_logprobs,
                              const std::optional<Tensor>& entropy,
                              const std::optional<Tensor>& is_weights,
                              const std::string& loss_mode, const std::vector<double>& loss_params,
                              std::optional<double> logratio_clamp, double kl_coef,
                              const std::string& kl_estimator, std::optional<double> kl_clamp,
                              double entropy_coef) {
  PolicyArgs c;
  ppo_check_2d(op, logprobs, mask, &c.B, &c.T);
  ppo_check_like(op, "old_logprobs", old_logprobs, logprobs);
  const auto acc = acc_dtype(logprobs);
  c.lp = as_contiguous(logprobs);
  c.old = as_contiguous(old_logprobs);
  c.adv = ppo_token_or_row(op, "advantages", advantages, c.B, c.T, acc, &c.adv_row);
  c.mask = bool_mask(mask);
  if (ref_logprobs) {
    ppo_check_like(op, "ref_logprobs", *ref_logprobs, logprobs);
    c.ref = as_contiguous(*ref_logprobs);
  }
  if (entropy) {
    ppo_check_like(op, "entropy", *entropy, logprobs);
    c.ent = as_contiguous(*entropy);
  }
  if (is_weights) {
    c.w = ppo_token_or_row(op, "is_weights", *is_weights, c.B, c.T, acc, &c.w_row);
  }
  // the loss spec (ppokernels/losses.py): a mode name and its PARAMS
  const int code = policy_mode_code(loss_mode.c_str());
  PPK_CHECK(code >= 0, op, ": unknown loss_mode '", loss_mode, "'");
  PPK_CHECK(static_cast<int64_t>(loss_params.size()) == kPolicyModeParams[code], op,
            ": loss_mode '", loss_mode, "' takes ", kPolicyModeParams[code],
            " loss_params, got ", loss_params.size());
  for (double v : loss_params) PPK_CHECK(!std::isnan(v), op, ": loss_params must not be NaN");
  const auto mode = static_cast<PolicyMode>(code);
  double clip_low, clip_high, dual, mp[4];
  policy_mode_scalars(mode, loss_params.data(), &clip_low, &clip_high, &dual, mp);
  PPK_CHECK(clip_low >= 0 && clip_high >= 0, op, ": the clip range must be >= 0");
  PPK_CHECK(dual == 0 || dual > 1, op, ": dual_clip must be > 1");
  KLEstimator est;
  bool st;
  PPK_CHECK(parse_kl_estimator(kl_estimator.c_str(), &est, &st), op,
            ": unknown kl_estimator '", kl_estimator, "'");
  c.p = PolicyParams<double>{clip_low,
                             clip_high,
                             dual,
                             logratio_clamp.value_or(0.0),
                             kl_coef,
                             kl_clamp.value_or(0.0),
                             entropy_coef,
                             {mp[0], mp[1], mp[2], mp[3]},
                             est,
                             mode,
                             st,
                             c.ref.defined(),
                             c.w.defined()};
  return c;
}

// Checks of the backward's own inputs, and the gradients' buffers: lp [B, T]; ref and ent [B, T]
// when ref_logprobs / entropy were given, else [0].
struct PolicyGrads {
  Tensor lp, ref, ent;
};

inline PolicyGrads policy_grad_outputs(const char* op, const PolicyArgs& c, const Tensor& grad,
                                       const Tensor& row_stats) {
  PPK_CHECK(row_stats.dim() == 2 && row_stats.size(0) == c.B &&
                row_stats.size(1) == kPolicyRowStats,
            op, ": row_stats must be [B, 4]");
  PPK_CHECK(grad.numel() == 1, op, ": grad must be a scalar");
  PolicyGrads o;
  o.lp = empty_as(c.lp);
  o.ref = c.ref.defined() ? empty_as(c.ref) : empty({0}, c.lp.scalar_type(), c.lp);
  o.ent = c.ent.defined() ? empty_as(c.ent) : empty({0}, c.lp.scalar_type(), c.lp);
  return o;
}

}  // namespace ppokernels
