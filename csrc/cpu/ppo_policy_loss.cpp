// CPU kernels of ppo_policy_loss: PPO's clipped surrogate (with dual clip, KL
// and entropy terms), a fused forward (loss and every metric in one pass over [B, T]) and a fused
// backward. The value loss is in value_loss.cpp; setup in ppokernels/ppo_policy_loss_args.h, the
// math of one token in ppokernels/ppo_policy_loss.h.
//
// Forward: torch::stable::parallel_for over rows; each row is reduced on its own (SIMD lanes,
// then the lanes in order) into per-row partial sums; a sequential pass over rows in double then
// applies the aggregation weights. The same row gives the same bits whatever the batch or thread
// count. Chunks of masked tokens are skipped outright (padding costs no work).
#include <vector>

#include "ppokernels/cpu_isa.h"
#include "ppokernels/cpu_vec.h"
#include "ppokernels/ppo_policy_loss_args.h"

namespace ppokernels::CPU_CAPABILITY {
namespace {

// Per-row token pointers of the policy inputs, typed.
template <typename scalar_t>
struct PolicyRow {
  using acc_t = acc_type<scalar_t>;
  const scalar_t *lp, *old, *ref, *ent;
  const acc_t *adv, *w;
  const bool* m;
  bool adv_row, w_row;

  PolicyRow(const PolicyArgs& c, int64_t b) {
    const int64_t o = b * c.T;
    lp = c.lp.const_data_ptr<scalar_t>() + o;
    old = c.old.const_data_ptr<scalar_t>() + o;
    ref = c.ref.defined() ? c.ref.const_data_ptr<scalar_t>() + o : nullptr;
    ent = c.ent.defined() ? c.ent.const_data_ptr<scalar_t>() + o : nullptr;
    adv = c.adv.const_data_ptr<acc_t>() + (c.adv_row ? b : o);
    w = c.w.defined() ? c.w.const_data_ptr<acc_t>() + (c.w_row ? b : o) : nullptr;
    m = c.mask.const_data_ptr<bool>() + o;
    adv_row = c.adv_row;
    w_row = c.w_row;
  }
  template <typename V>
  V advantage(int64_t t) const {
    return adv_row ? V(adv[0]) : vload<V>(adv + t);
  }
  template <typename V>
  V weight(int64_t t) const {
    return w == nullptr ? V(1) : (w_row ? V(w[0]) : vload<V>(w + t));
  }
};

// First pass over one row (gspo, geo_mean, vespo): the row sums of policy_row_terms, then the
// row values ra, rb and the row's surrogate loss (policy_row_values). out = {ra, rb, row_loss}.
template <typename scalar_t>
void row_pass(const PolicyRow<scalar_t>& row, int64_t width,
              const PolicyParams<acc_type<scalar_t>>& p, double* out) {
  double s[4];
  row_accumulate<4, scalar_t>(
      width, row.m,
      [&](auto tag, int64_t t, auto* acc) {
        using V = decltype(tag);
        const V valid = vload_mask<V>(row.m + t);
        const V lr = clamp_logratio(vload<V>(row.lp + t) - vload<V>(row.old + t), p.logratio_clamp);
        V s0, s1, s2;
        policy_row_terms(p.mode, p.has_w, lr, row.template advantage<V>(t),
                         row.template weight<V>(t), p.clip_low, p.clip_high, &s0, &s1, &s2);
        const auto on = valid > V(0);
        acc[0] = vadd_where(on, acc[0], s0);
        acc[1] = vadd_where(on, acc[1], s1);
        acc[2] = vadd_where(on, acc[2], s2);
        acc[3] = acc[3] + valid;
      },
      s);
  policy_row_values(p.mode, p.has_w, s[0], s[1], s[2], s[3], &out[0], &out[1], &out[2]);
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> ppo_policy_loss_cpu(
    const Tensor& logprobs, const Tensor& old_logprobs, const Tensor& advantages,
    const Tensor& mask, const std::optional<Tensor>& ref_logprobs,
    const std::optional<Tensor>& entropy, const std::optional<Tensor>& is_weights,
    const std::string& loss_mode, const std::vector<double>& loss_params,
    std::optional<double> logratio_clamp, const std::string& agg,
    std::optional<double> num_tokens, std::optional<double> num_seqs, double kl_coef,
    const std::string& kl_estimator, std::optional<double> kl_clamp, double entropy_coef) {
  const char* op = "ppo_policy_loss";
  const AggMode mode = ppo_agg_mode(op, agg);
  const PolicyArgs c = policy_args(op, logprobs, old_logprobs, advantages, mask, ref_logprobs,
                                   entropy, is_weights, loss_mode, loss_params,
                                   logratio_clamp, kl_coef, kl_estimator, kl_clamp,
                                   entropy_coef);
  const int64_t B = c.B, T = c.T;
  const auto acc = acc_dtype(logprobs);
  std::vector<double> part(static_cast<size_t>(B) * kPolicyK, 0.0);
  std::vector<double> rowv(static_cast<size_t>(B) * 3, 0.0);  // ra, rb, row loss
  PPK_DISPATCH_FLOATING(c.lp.scalar_type(), "ppo_policy_cpu", [&] {
    parallel_for_work(B, T, [&](int64_t b0, int64_t b1) {
      const auto prm = policy_params_as<acc_type<scalar_t>>(c.p);
      for (int64_t b = b0; b < b1; ++b) {
        const PolicyRow<scalar_t> row(c, b);
        double* rv = rowv.data() + 3 * b;
        if (policy_row_pass(prm.mode)) row_pass(row, T, prm, rv);
        row_accumulate<kPolicyK, scalar_t>(
            T, row.m,
            [&](auto tag, int64_t t, auto* acc_k) {
              using V = decltype(tag);
              const auto valid = vload_mask<V>(row.m + t) > V(0);
              const V ref = row.ref ? vload<V>(row.ref + t) : V(0);
              V kl, clipped, dual, neg_lr;
              const V loss = policy_token_forward(prm, vload<V>(row.lp + t), vload<V>(row.old + t),
                                                  ref, row.template advantage<V>(t),
                                                  row.template weight<V>(t), V(rv[0]), V(rv[1]),
                                                  &kl, &clipped, &dual, &neg_lr);
              const V ent = row.ent ? vload<V>(row.ent + t) : V(0);
              const V vals[kPolicyK] = {V(1), loss, kl, ent, clipped, neg_lr, dual};
              for (int k = 0; k < kPolicyK; ++k) acc_k[k] = vadd_where(valid, acc_k[k], vals[k]);
            },
            part.data() + b * kPolicyK);
        part[b * kPolicyK + kPLoss] += rv[2];  // geo_mean's per-row loss (0 otherwise)
      }
    });
  });
  // Fixed-order reduction over rows, in double.
  double n_total = 0;
  for (int64_t b = 0; b < B; ++b) n_total += part[b * kPolicyK + kPN];
  double loss = 0, kl = 0, ent = 0, clip = 0, neg_lr = 0, dual = 0;
  std::vector<double> row_stats(B * kPolicyRowStats);
  double* rs = row_stats.data();
  for (int64_t b = 0; b < B; ++b) {
    const double* p = part.data() + b * kPolicyK;
    const double w = agg_row_scale(mode, p[kPN], n_total, num_tokens.value_or(0.0),
                                   num_seqs.value_or(0.0), B, T);
    const double wp = policy_surrogate_scale(c.p.mode, w, num_seqs.value_or(0.0), B);
    double* r = rs + kPolicyRowStats * b;
    r[0] = w;
    r[1] = rowv[3 * b];
    r[2] = wp;
    r[3] = rowv[3 * b + 1];
    // an empty row adds nothing (and no 0 * inf)
    if (wp != 0) loss += wp * p[kPLoss];
    if (w == 0) continue;
    loss += w * (kl_coef * p[kPKL] - entropy_coef * p[kPEntropy]);
    kl += w * p[kPKL];
    ent += w * p[kPEntropy];
  }
  for (int64_t b = 0; b < B; ++b) {
    const double* p = part.data() + b * kPolicyK;
    clip += p[kPClip];
    neg_lr += p[kPNegLR];
    dual += p[kPDual];
  }
  const double inv_n = n_total > 0 ? 1.0 / n_total : 0.0;
  const double mv[kPolicyMetrics] = {clip * inv_n, neg_lr * inv_n, dual * inv_n, kl, ent};
  return {scalar_tensor(loss, acc, logprobs), tensor_from(mv, {kPolicyMetrics}, acc, logprobs),
          tensor_from(rs, {B, kPolicyRowStats}, acc, logprobs)};
}

std::tuple<Tensor, Tensor, Tensor> ppo_policy_loss_backward_cpu(
    const Tensor& grad, const Tensor& logprobs, const Tensor& old_logprobs,
    const Tensor& advantages, const Tensor& mask,
    const std::optional<Tensor>& ref_logprobs, const std::optional<Tensor>& entropy,
    const std::optional<Tensor>& is_weights, const Tensor& row_stats,
    const std::string& loss_mode, const std::vector<double>& loss_params,
    std::optional<double> logratio_clamp, double kl_coef, const std::string& kl_estimator,
    std::optional<double> kl_clamp, double entropy_coef) {
  const char* op = "ppo_policy_loss_backward";
  const PolicyArgs c = policy_args(op, logprobs, old_logprobs, advantages, mask, ref_logprobs,
                                   entropy, is_weights, loss_mode, loss_params,
                                   logratio_clamp, kl_coef, kl_estimator, kl_clamp,
                                   entropy_coef);
  const int64_t B = c.B, T = c.T;
  const PolicyGrads out = policy_grad_outputs(op, c, grad, row_stats);
  const Tensor &grad_lp = out.lp, &grad_ref = out.ref, &grad_ent = out.ent;
  const std::vector<double> rs = doubles_of(row_stats);
  const double* rsp = rs.data();
  const double g = item_double(grad);
  PPK_DISPATCH_FLOATING(c.lp.scalar_type(), "ppo_policy_bwd_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    scalar_t* glp = grad_lp.mutable_data_ptr<scalar_t>();
    scalar_t* gref = c.ref.defined() ? grad_ref.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gent = c.ent.defined() ? grad_ent.mutable_data_ptr<scalar_t>() : nullptr;
    parallel_for_work(B, T, [&](int64_t b0, int64_t b1) {
      const auto prm = policy_params_as<acc_t>(c.p);
      for (int64_t b = b0; b < b1; ++b) {
        const PolicyRow<scalar_t> row(c, b);
        const int64_t o = b * T;
        const double* r = rsp + kPolicyRowStats * b;
        const double scale = g * r[0], scale_pg = g * r[2];
        auto zero = [&](int64_t t, int64_t n) {
          std::fill_n(glp + o + t, n, scalar_t(0));
          if (gref) std::fill_n(gref + o + t, n, scalar_t(0));
          if (gent) std::fill_n(gent + o + t, n, scalar_t(0));
        };
        // an empty row (or a zero upstream gradient) gets zeros, no work
        row_map<scalar_t>(
            T, row.m, scale != 0 || scale_pg != 0,
            [&](auto tag, int64_t t) {
              using V = decltype(tag);
              const auto valid = vload_mask<V>(row.m + t) > V(0);
              const V ref = row.ref ? vload<V>(row.ref + t) : V(0);
              V dkl;
              const V d = policy_token_backward(prm, vload<V>(row.lp + t), vload<V>(row.old + t), ref,
                                                row.template advantage<V>(t),
                                                row.template weight<V>(t), V(r[1]), V(r[3]), &dkl);
              const V sc(static_cast<acc_t>(scale)), sp(static_cast<acc_t>(scale_pg));
              vstore(glp + o + t, vselect(valid, sp * d + sc * dkl, V(0)));
              if (gref) vstore(gref + o + t, vselect(valid, V(0) - sc * dkl, V(0)));
              if (gent) {
                vstore(gent + o + t, vselect(valid, V(static_cast<acc_t>(-entropy_coef)) * sc, V(0)));
              }
            },
            zero);
      }
    });
  });
  return {grad_lp, grad_ref, grad_ent};
}

// This level's kernels, registered by csrc/cpu_isa.cpp when the running CPU selects the level.
void register_ppo_policy_loss(Library& m) {
  m.impl("ppo_policy_loss", TORCH_BOX(&ppo_policy_loss_cpu));
  m.impl("ppo_policy_loss_backward", TORCH_BOX(&ppo_policy_loss_backward_cpu));
}

}  // namespace ppokernels::CPU_CAPABILITY
