// CPU kernels of the ppo_loss family: the clipped policy loss and the clipped value loss, each a
// fused forward (loss and every metric in one pass over [B, T]) and a fused backward.
//
// Forward: at::parallel_for over rows; each row is reduced on its own (SIMD lanes, then the lanes
// in order) into per-row partial sums; a sequential pass over rows in double then applies the
// aggregation weights. The same row gives the same bits whatever the batch or thread count.
// Chunks of 8 masked tokens are skipped outright (padding costs no work).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "ppokernels/aten_utils.h"
#include "ppokernels/cpu_vec.h"
#include "ppokernels/ppo_loss.h"

namespace ppokernels {
namespace {

constexpr int64_t kW = VecF::size();

template <typename V, typename scalar_t>
V load(const scalar_t* p, int64_t t) {
  if constexpr (std::is_same_v<V, VecF>) {
    return VecF::loadu(p + t);
  } else {
    return V(p[t]);
  }
}

// Mask of one chunk as 0/1 values of V.
template <typename V>
V load_mask(const bool* m, int64_t t) {
  if constexpr (std::is_same_v<V, VecF>) {
    float buf[kW];
    for (int64_t j = 0; j < kW; ++j) buf[j] = m[t + j] ? 1.f : 0.f;
    return VecF::loadu(buf);
  } else {
    return V(m[t] ? 1 : 0);
  }
}

bool chunk_masked_out(const bool* m, int64_t t) {
  uint64_t bits;
  static_assert(kW == 8 || kW == 16, "chunk size");
  for (int64_t j = 0; j < kW; j += 8) {
    std::memcpy(&bits, m + t + j, 8);
    if (bits != 0) return false;
  }
  return true;
}

// out[k] = sum over the valid tokens of one row of the K values f adds into acc[k].
// f(V(0), t, acc) adds the contribution of tokens [t, t + width(V)) (masking inside).
template <int K, typename scalar_t, typename F>
void row_accumulate(int64_t width, const bool* m, F f, double* out) {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t t = 0;
  for (int k = 0; k < K; ++k) out[k] = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    VecF acc[K];
    for (int k = 0; k < K; ++k) acc[k] = VecF(0.f);
    for (; t + kW <= width; t += kW) {
      if (!chunk_masked_out(m, t)) f(VecF(0.f), t, acc);
    }
    float buf[kW];
    for (int k = 0; k < K; ++k) {
      acc[k].store(buf);
      float s = 0;
      for (int64_t j = 0; j < kW; ++j) s += buf[j];
      out[k] = s;
    }
  }
  acc_t tail[K] = {};
  for (; t < width; ++t) {
    if (m[t]) f(acc_t(0), t, tail);
  }
  for (int k = 0; k < K; ++k) out[k] += static_cast<double>(tail[k]);
}

// Calls f(V(0), t) on chunks with a valid token, z(t, n) on masked-out chunks (to write zeros).
template <typename scalar_t, typename F, typename Z>
void row_map(int64_t width, const bool* m, F f, Z z) {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t t = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    for (; t + kW <= width; t += kW) {
      if (chunk_masked_out(m, t)) {
        z(t, kW);
      } else {
        f(VecF(0.f), t);
      }
    }
  }
  for (; t < width; ++t) {
    if (m[t]) {
      f(acc_t(0), t);
    } else {
      z(t, 1);
    }
  }
}

template <typename V, typename scalar_t>
void store(scalar_t* p, int64_t t, V v) {
  if constexpr (std::is_same_v<V, VecF>) {
    v.store(p + t);
  } else {
    p[t] = static_cast<scalar_t>(v);
  }
}

// ------------------------------------------------------------------------------- inputs
struct Rows {
  int64_t B, T;
};

// advantages / is_weights: [B, T] or [B], converted to the accumulation dtype.
at::Tensor per_token_or_row(const char* op, const char* name, const at::Tensor& x, Rows r,
                            at::ScalarType acc, bool* per_row) {
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": ", name, " must be floating point");
  const bool full = x.dim() == 2 && x.size(0) == r.B && x.size(1) == r.T;
  *per_row = x.dim() == 1 && x.size(0) == r.B;
  TORCH_CHECK(full || *per_row, op, ": ", name, " must have shape [B, T] or [B]");
  return x.to(acc).contiguous();
}

void check_like(const char* op, const char* name, const at::Tensor& x, const at::Tensor& like) {
  TORCH_CHECK(x.sizes() == like.sizes(), op, ": ", name, " must have the shape of the data");
  TORCH_CHECK(x.scalar_type() == like.scalar_type(), op, ": ", name, " must have the data's dtype");
}

Rows check_2d(const char* op, const at::Tensor& x, const at::Tensor& mask) {
  TORCH_CHECK(x.dim() == 2, op, ": inputs must be [B, T]");
  TORCH_CHECK(mask.sizes() == x.sizes(), op, ": mask must have the shape of the data");
  return {x.size(0), x.size(1)};
}

struct PolicyCall {
  Rows r;
  at::Tensor lp, old, ref, ent, adv, w, mask;
  bool adv_row = false, w_row = false;
  PolicyParams<double> p;
};

PolicyCall prepare_policy(const char* op, const at::Tensor& logprobs,
                          const at::Tensor& old_logprobs, const at::Tensor& advantages,
                          const at::Tensor& mask, const std::optional<at::Tensor>& ref_logprobs,
                          const std::optional<at::Tensor>& entropy,
                          const std::optional<at::Tensor>& is_weights, double clip_low,
                          double clip_high, std::optional<double> dual_clip,
                          std::optional<double> logratio_clamp, const std::string& ratio_level,
                          double kl_coef, const std::string& kl_estimator,
                          std::optional<double> kl_clamp, double entropy_coef) {
  PolicyCall c;
  c.r = check_2d(op, logprobs, mask);
  check_like(op, "old_logprobs", old_logprobs, logprobs);
  const auto acc = acc_dtype(logprobs);
  c.lp = logprobs.contiguous();
  c.old = old_logprobs.contiguous();
  c.adv = per_token_or_row(op, "advantages", advantages, c.r, acc, &c.adv_row);
  c.mask = bool_mask(mask);
  if (ref_logprobs) {
    check_like(op, "ref_logprobs", *ref_logprobs, logprobs);
    c.ref = ref_logprobs->contiguous();
  }
  if (entropy) {
    check_like(op, "entropy", *entropy, logprobs);
    c.ent = entropy->contiguous();
  }
  if (is_weights) c.w = per_token_or_row(op, "is_weights", *is_weights, c.r, acc, &c.w_row);
  TORCH_CHECK(clip_low >= 0 && clip_low < 1 && clip_high >= 0, op,
              ": clip_low must be in [0, 1) and clip_high >= 0");
  TORCH_CHECK(!dual_clip || *dual_clip > 1, op, ": dual_clip must be > 1");
  bool seq;
  TORCH_CHECK(parse_ratio_level(ratio_level.c_str(), &seq), op,
              ": ratio_level must be 'token' or 'sequence'");
  KLEstimator est;
  bool st;
  TORCH_CHECK(parse_kl_estimator(kl_estimator.c_str(), &est, &st), op,
              ": unknown kl_estimator '", kl_estimator, "'");
  c.p = PolicyParams<double>{clip_low,
                             clip_high,
                             dual_clip.value_or(0.0),
                             logratio_clamp.value_or(0.0),
                             kl_coef,
                             kl_clamp.value_or(0.0),
                             entropy_coef,
                             est,
                             st,
                             seq,
                             c.ref.defined()};
  return c;
}

template <typename scalar_t>
const scalar_t* opt_ptr(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<scalar_t>() : nullptr;
}

// Per-row token pointers of the policy inputs, typed.
template <typename scalar_t>
struct PolicyRow {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t *lp, *old, *ref, *ent;
  const acc_t *adv, *w;
  const bool* m;
  bool adv_row, w_row;

  PolicyRow(const PolicyCall& c, int64_t b) {
    const int64_t o = b * c.r.T;
    lp = c.lp.data_ptr<scalar_t>() + o;
    old = c.old.data_ptr<scalar_t>() + o;
    ref = c.ref.defined() ? c.ref.data_ptr<scalar_t>() + o : nullptr;
    ent = c.ent.defined() ? c.ent.data_ptr<scalar_t>() + o : nullptr;
    adv = c.adv.data_ptr<acc_t>() + (c.adv_row ? b : o);
    w = c.w.defined() ? c.w.data_ptr<acc_t>() + (c.w_row ? b : o) : nullptr;
    m = c.mask.data_ptr<bool>() + o;
    adv_row = c.adv_row;
    w_row = c.w_row;
  }
  template <typename V>
  V advantage(int64_t t) const {
    return adv_row ? V(adv[0]) : load<V>(adv, t);
  }
  template <typename V>
  V weight(int64_t t) const {
    return w == nullptr ? V(1) : (w_row ? V(w[0]) : load<V>(w, t));
  }
};

// Sequence log-ratio of one row: masked mean of the clamped token log-ratios (0 if none valid).
template <typename scalar_t>
double seq_logratio(const PolicyRow<scalar_t>& row, int64_t width, double clamp) {
  double s[2];
  row_accumulate<2, scalar_t>(
      width, row.m,
      [&](auto tag, int64_t t, auto* acc) {
        using V = decltype(tag);
        const V valid = load_mask<V>(row.m, t);
        const V lr = clamp_logratio(load<V>(row.lp, t) - load<V>(row.old, t), clamp);
        acc[0] = acc[0] + vselect(valid > V(0), lr, V(0));
        acc[1] = acc[1] + valid;
      },
      s);
  return s[1] > 0 ? s[0] / s[1] : 0.0;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> ppo_policy_loss_cpu(
    const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& advantages,
    const at::Tensor& mask, const std::optional<at::Tensor>& ref_logprobs,
    const std::optional<at::Tensor>& entropy, const std::optional<at::Tensor>& is_weights,
    double clip_low, double clip_high, std::optional<double> dual_clip,
    std::optional<double> logratio_clamp, const std::string& ratio_level, const std::string& agg,
    std::optional<double> num_tokens, std::optional<double> num_seqs, double kl_coef,
    const std::string& kl_estimator, std::optional<double> kl_clamp, double entropy_coef) {
  const char* op = "ppo_policy_loss";
  AggMode mode;
  TORCH_CHECK(parse_agg_mode(agg.c_str(), &mode), op, ": unknown agg '", agg, "'");
  const PolicyCall c = prepare_policy(op, logprobs, old_logprobs, advantages, mask, ref_logprobs,
                                      entropy, is_weights, clip_low, clip_high, dual_clip,
                                      logratio_clamp, ratio_level, kl_coef, kl_estimator,
                                      kl_clamp, entropy_coef);
  const int64_t B = c.r.B, T = c.r.T;
  const auto acc = acc_dtype(logprobs);
  const auto opts = logprobs.options().dtype(acc);
  std::vector<double> part(static_cast<size_t>(B) * kPolicyK, 0.0);
  std::vector<double> seq_lr(static_cast<size_t>(B), 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.lp.scalar_type(), "ppo_policy_cpu", [&] {
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const PolicyRow<scalar_t> row(c, b);
        const double s = c.p.seq_ratio ? seq_logratio(row, T, c.p.logratio_clamp) : 0.0;
        seq_lr[b] = s;
        row_accumulate<kPolicyK, scalar_t>(
            T, row.m,
            [&](auto tag, int64_t t, auto* acc_k) {
              using V = decltype(tag);
              const auto valid = load_mask<V>(row.m, t) > V(0);
              const V ref = row.ref ? load<V>(row.ref, t) : V(0);
              V kl, clipped, dual, neg_lr;
              const V loss = policy_token_forward(c.p, load<V>(row.lp, t), load<V>(row.old, t),
                                                  ref, row.template advantage<V>(t),
                                                  row.template weight<V>(t), V(s), &kl, &clipped,
                                                  &dual, &neg_lr);
              const V ent = row.ent ? load<V>(row.ent, t) : V(0);
              const V vals[kPolicyK] = {V(1), loss, kl, ent, clipped, neg_lr, dual};
              for (int k = 0; k < kPolicyK; ++k) acc_k[k] = acc_k[k] + vselect(valid, vals[k], V(0));
            },
            part.data() + b * kPolicyK);
      }
    });
  });
  // Fixed-order reduction over rows, in double.
  double n_total = 0;
  for (int64_t b = 0; b < B; ++b) n_total += part[b * kPolicyK + kPN];
  double loss = 0, kl = 0, ent = 0, clip = 0, neg_lr = 0, dual = 0;
  auto row_stats = at::empty({B, 2}, opts.dtype(at::kDouble));
  double* rs = row_stats.data_ptr<double>();
  for (int64_t b = 0; b < B; ++b) {
    const double* p = part.data() + b * kPolicyK;
    const double w = agg_row_scale(mode, p[kPN], n_total, num_tokens.value_or(0.0),
                                   num_seqs.value_or(0.0), B, T);
    rs[2 * b] = w;
    rs[2 * b + 1] = seq_lr[b];
    if (w == 0) continue;  // an empty row adds nothing (and no 0 * inf)
    loss += w * (p[kPLoss] + kl_coef * p[kPKL] - entropy_coef * p[kPEntropy]);
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
  auto metrics = at::tensor({clip * inv_n, neg_lr * inv_n, dual * inv_n, kl, ent},
                            at::TensorOptions().dtype(at::kDouble));
  return {at::scalar_tensor(loss, opts), metrics.to(acc), row_stats.to(acc)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ppo_policy_loss_backward_cpu(
    const at::Tensor& grad, const at::Tensor& logprobs, const at::Tensor& old_logprobs,
    const at::Tensor& advantages, const at::Tensor& mask,
    const std::optional<at::Tensor>& ref_logprobs, const std::optional<at::Tensor>& entropy,
    const std::optional<at::Tensor>& is_weights, const at::Tensor& row_stats, double clip_low,
    double clip_high, std::optional<double> dual_clip, std::optional<double> logratio_clamp,
    const std::string& ratio_level, double kl_coef, const std::string& kl_estimator,
    std::optional<double> kl_clamp, double entropy_coef) {
  const char* op = "ppo_policy_loss_backward";
  const PolicyCall c = prepare_policy(op, logprobs, old_logprobs, advantages, mask, ref_logprobs,
                                      entropy, is_weights, clip_low, clip_high, dual_clip,
                                      logratio_clamp, ratio_level, kl_coef, kl_estimator,
                                      kl_clamp, entropy_coef);
  const int64_t B = c.r.B, T = c.r.T;
  TORCH_CHECK(row_stats.dim() == 2 && row_stats.size(0) == B && row_stats.size(1) == 2, op,
              ": row_stats must be [B, 2]");
  TORCH_CHECK(grad.numel() == 1, op, ": grad must be a scalar");
  const auto rs = row_stats.to(at::kDouble).contiguous();
  const double* rsp = rs.data_ptr<double>();
  const double g = grad.to(at::kDouble).item<double>();
  auto grad_lp = at::empty_like(c.lp);
  auto grad_ref = c.ref.defined() ? at::empty_like(c.ref) : at::empty({0}, c.lp.options());
  auto grad_ent = c.ent.defined() ? at::empty_like(c.ent) : at::empty({0}, c.lp.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.lp.scalar_type(), "ppo_policy_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* glp = grad_lp.data_ptr<scalar_t>();
    scalar_t* gref = c.ref.defined() ? grad_ref.data_ptr<scalar_t>() : nullptr;
    scalar_t* gent = c.ent.defined() ? grad_ent.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const PolicyRow<scalar_t> row(c, b);
        const int64_t o = b * T;
        const double scale = g * rsp[2 * b];
        const double s = rsp[2 * b + 1];
        auto zero = [&](int64_t t, int64_t n) {
          std::fill_n(glp + o + t, n, scalar_t(0));
          if (gref) std::fill_n(gref + o + t, n, scalar_t(0));
          if (gent) std::fill_n(gent + o + t, n, scalar_t(0));
        };
        if (scale == 0) {  // empty row (or zero upstream gradient): zeros, no work
          zero(0, T);
          continue;
        }
        row_map<scalar_t>(
            T, row.m,
            [&](auto tag, int64_t t) {
              using V = decltype(tag);
              const auto valid = load_mask<V>(row.m, t) > V(0);
              const V ref = row.ref ? load<V>(row.ref, t) : V(0);
              V dkl;
              const V d = policy_token_backward(c.p, load<V>(row.lp, t), load<V>(row.old, t), ref,
                                                row.template advantage<V>(t),
                                                row.template weight<V>(t), V(s), &dkl);
              const V sc(static_cast<acc_t>(scale));
              store<V>(glp + o, t, vselect(valid, sc * d, V(0)));
              if (gref) store<V>(gref + o, t, vselect(valid, V(0) - sc * dkl, V(0)));
              if (gent) {
                store<V>(gent + o, t, vselect(valid, V(static_cast<acc_t>(-entropy_coef)) * sc, V(0)));
              }
            },
            zero);
      }
    });
  });
  return {grad_lp, grad_ref, grad_ent};
}

// ---------------------------------------------------------------------------- value loss
namespace {
struct ValueCall {
  Rows r;
  at::Tensor v, vo, ret, mask;
  bool ret_row = false;
};

ValueCall prepare_value(const char* op, const at::Tensor& values, const at::Tensor& old_values,
                        const at::Tensor& returns, const at::Tensor& mask,
                        std::optional<double> clip) {
  ValueCall c;
  c.r = check_2d(op, values, mask);
  check_like(op, "old_values", old_values, values);
  c.v = values.contiguous();
  c.vo = old_values.contiguous();
  c.ret = per_token_or_row(op, "returns", returns, c.r, acc_dtype(values), &c.ret_row);
  TORCH_CHECK(!c.ret_row, op, ": returns must have shape [B, T]");
  c.mask = bool_mask(mask);
  TORCH_CHECK(!clip || *clip > 0, op, ": clip must be > 0");
  return c;
}
}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> value_loss_cpu(
    const at::Tensor& values, const at::Tensor& old_values, const at::Tensor& returns,
    const at::Tensor& mask, std::optional<double> clip, const std::string& agg,
    std::optional<double> num_tokens, std::optional<double> num_seqs) {
  const char* op = "value_loss";
  AggMode mode;
  TORCH_CHECK(parse_agg_mode(agg.c_str(), &mode), op, ": unknown agg '", agg, "'");
  const ValueCall c = prepare_value(op, values, old_values, returns, mask, clip);
  const int64_t B = c.r.B, T = c.r.T;
  const double eps = clip.value_or(0.0);
  const auto acc = acc_dtype(values);
  std::vector<double> part(static_cast<size_t>(B) * 3, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.v.scalar_type(), "value_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t o = b * T;
        const scalar_t *v = c.v.data_ptr<scalar_t>() + o, *vo = c.vo.data_ptr<scalar_t>() + o;
        const acc_t* ret = c.ret.data_ptr<acc_t>() + o;
        const bool* m = c.mask.data_ptr<bool>() + o;
        row_accumulate<3, scalar_t>(
            T, m,
            [&](auto tag, int64_t t, auto* acc_k) {
              using V = decltype(tag);
              const auto valid = load_mask<V>(m, t) > V(0);
              V d, clipped;
              const V loss = value_token(load<V>(v, t), load<V>(vo, t), load<V>(ret, t), eps, &d,
                                         &clipped);
              acc_k[0] = acc_k[0] + vselect(valid, V(1), V(0));
              acc_k[1] = acc_k[1] + vselect(valid, loss, V(0));
              acc_k[2] = acc_k[2] + vselect(valid, clipped, V(0));
            },
            part.data() + 3 * b);
      }
    });
  });
  double n_total = 0, loss = 0, clipped = 0;
  for (int64_t b = 0; b < B; ++b) n_total += part[3 * b];
  auto row_scale = at::empty({B}, at::TensorOptions().dtype(at::kDouble));
  double* rs = row_scale.data_ptr<double>();
  for (int64_t b = 0; b < B; ++b) {
    const double w = agg_row_scale(mode, part[3 * b], n_total, num_tokens.value_or(0.0),
                                   num_seqs.value_or(0.0), B, T);
    rs[b] = w;
    if (w != 0) loss += w * part[3 * b + 1];
    clipped += part[3 * b + 2];
  }
  const auto opts = values.options().dtype(acc);
  return {at::scalar_tensor(loss, opts),
          at::scalar_tensor(n_total > 0 ? clipped / n_total : 0.0, opts), row_scale.to(acc)};
}

at::Tensor value_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& values,
                                   const at::Tensor& old_values, const at::Tensor& returns,
                                   const at::Tensor& mask, const at::Tensor& row_scale,
                                   std::optional<double> clip) {
  const char* op = "value_loss_backward";
  const ValueCall c = prepare_value(op, values, old_values, returns, mask, clip);
  const int64_t B = c.r.B, T = c.r.T;
  TORCH_CHECK(row_scale.dim() == 1 && row_scale.size(0) == B, op, ": row_scale must be [B]");
  TORCH_CHECK(grad.numel() == 1, op, ": grad must be a scalar");
  const auto rs = row_scale.to(at::kDouble).contiguous();
  const double* rsp = rs.data_ptr<double>();
  const double g = grad.to(at::kDouble).item<double>();
  const double eps = clip.value_or(0.0);
  auto grad_v = at::empty_like(c.v);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.v.scalar_type(), "value_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* gv = grad_v.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t o = b * T;
        const scalar_t *v = c.v.data_ptr<scalar_t>() + o, *vo = c.vo.data_ptr<scalar_t>() + o;
        const acc_t* ret = c.ret.data_ptr<acc_t>() + o;
        const bool* m = c.mask.data_ptr<bool>() + o;
        const double scale = g * rsp[b];
        auto zero = [&](int64_t t, int64_t n) { std::fill_n(gv + o + t, n, scalar_t(0)); };
        if (scale == 0) {
          zero(0, T);
          continue;
        }
        row_map<scalar_t>(
            T, m,
            [&](auto tag, int64_t t) {
              using V = decltype(tag);
              const auto valid = load_mask<V>(m, t) > V(0);
              V d, clipped;
              value_token(load<V>(v, t), load<V>(vo, t), load<V>(ret, t), eps, &d, &clipped);
              store<V>(gv + o, t, vselect(valid, V(static_cast<acc_t>(scale)) * d, V(0)));
            },
            zero);
      }
    });
  });
  return grad_v;
}

TORCH_LIBRARY_IMPL(ppokernels, CPU, m) {
  m.impl("ppo_policy_loss", &ppo_policy_loss_cpu);
  m.impl("ppo_policy_loss_backward", &ppo_policy_loss_backward_cpu);
  m.impl("value_loss", &value_loss_cpu);
  m.impl("value_loss_backward", &value_loss_backward_cpu);
}

}  // namespace ppokernels
