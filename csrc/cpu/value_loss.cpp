// CPU kernels of value_loss, the clipped value loss: a fused forward (loss and clip fraction in
// one pass over [B, T]) and its backward. Same structure as the policy loss (ppo_policy_loss.cpp);
// setup in ppokernels/value_loss_args.h, the math of one token in ppokernels/value_loss.h, the
// aggregation in ppokernels/agg.h.
#include <vector>

#include "ppokernels/cpu_isa.h"
#include "ppokernels/cpu_vec.h"
#include "ppokernels/value_loss_args.h"

namespace ppokernels::CPU_CAPABILITY {
namespace {

// Per-row token pointers of the value inputs, typed; token() is the loss of tokens
// [t, t + width(V)) and its gradient.
template <typename scalar_t>
struct ValueRow {
  using acc_t = acc_type<scalar_t>;
  const scalar_t *v, *vo;
  const acc_t* ret;
  const bool* m;

  ValueRow(const ValueArgs& c, int64_t b)
      : v(c.v.const_data_ptr<scalar_t>() + b * c.T),
        vo(c.vo.const_data_ptr<scalar_t>() + b * c.T),
        ret(c.ret.const_data_ptr<acc_t>() + b * c.T),
        m(c.mask.const_data_ptr<bool>() + b * c.T) {}
  template <typename V>
  V token(int64_t t, double clip, V* d, V* clipped) const {
    return value_token(vload<V>(v + t), vload<V>(vo + t), vload<V>(ret + t), clip, d, clipped);
  }
};

}  // namespace

std::tuple<Tensor, Tensor, Tensor> value_loss_cpu(
    const Tensor& values, const Tensor& old_values, const Tensor& returns,
    const Tensor& mask, std::optional<double> clip, const std::string& agg,
    std::optional<double> num_tokens, std::optional<double> num_seqs) {
  const char* op = "value_loss";
  const AggMode mode = ppo_agg_mode(op, agg);
  const ValueArgs c = value_args(op, values, old_values, returns, mask, clip);
  const int64_t B = c.B, T = c.T;
  const double eps = c.clip;
  const auto acc = acc_dtype(values);
  std::vector<double> part(static_cast<size_t>(B) * 3, 0.0);
  PPK_DISPATCH_FLOATING(c.v.scalar_type(), "value_loss_cpu", [&] {
    parallel_for_work(B, T, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const ValueRow<scalar_t> row(c, b);
        row_accumulate<3, scalar_t>(
            T, row.m,
            [&](auto tag, int64_t t, auto* acc_k) {
              using V = decltype(tag);
              const auto valid = vload_mask<V>(row.m + t) > V(0);
              V d, clipped;
              const V loss = row.token(t, eps, &d, &clipped);
              acc_k[0] = vadd_where(valid, acc_k[0], V(1));
              acc_k[1] = vadd_where(valid, acc_k[1], loss);
              acc_k[2] = vadd_where(valid, acc_k[2], clipped);
            },
            part.data() + 3 * b);
      }
    });
  });
  double n_total = 0, loss = 0, clipped = 0;
  for (int64_t b = 0; b < B; ++b) n_total += part[3 * b];
  std::vector<double> row_scale(B);
  double* rs = row_scale.data();
  for (int64_t b = 0; b < B; ++b) {
    const double w = agg_row_scale(mode, part[3 * b], n_total, num_tokens.value_or(0.0),
                                   num_seqs.value_or(0.0), B, T);
    rs[b] = w;
    if (w != 0) loss += w * part[3 * b + 1];
    clipped += part[3 * b + 2];
  }
  return {scalar_tensor(loss, acc, values),
          scalar_tensor(n_total > 0 ? clipped / n_total : 0.0, acc, values),
          tensor_from(rs, {B}, acc, values)};
}

Tensor value_loss_backward_cpu(const Tensor& grad, const Tensor& values,
                               const Tensor& old_values, const Tensor& returns,
                               const Tensor& mask, const Tensor& row_scale,
                               std::optional<double> clip) {
  const char* op = "value_loss_backward";
  const ValueArgs c = value_args(op, values, old_values, returns, mask, clip);
  const int64_t B = c.B, T = c.T;
  auto grad_v = value_grad_output(op, c, grad, row_scale);
  const std::vector<double> rs = doubles_of(row_scale);
  const double* rsp = rs.data();
  const double g = item_double(grad);
  const double eps = c.clip;
  PPK_DISPATCH_FLOATING(c.v.scalar_type(), "value_bwd_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    scalar_t* gv = grad_v.mutable_data_ptr<scalar_t>();
    parallel_for_work(B, T, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t o = b * T;
        const ValueRow<scalar_t> row(c, b);
        const double scale = g * rsp[b];
        auto zero = [&](int64_t t, int64_t n) { std::fill_n(gv + o + t, n, scalar_t(0)); };
        // an empty row (or a zero upstream gradient) gets zeros, no work
        row_map<scalar_t>(
            T, row.m, scale != 0,
            [&](auto tag, int64_t t) {
              using V = decltype(tag);
              const auto valid = vload_mask<V>(row.m + t) > V(0);
              V d, clipped;
              row.token(t, eps, &d, &clipped);
              vstore(gv + o + t, vselect(valid, V(static_cast<acc_t>(scale)) * d, V(0)));
            },
            zero);
      }
    });
  });
  return grad_v;
}

// This level's kernels, registered by csrc/cpu_isa.cpp when the running CPU selects the level.
void register_value_loss(Library& m) {
  m.impl("value_loss", TORCH_BOX(&value_loss_cpu));
  m.impl("value_loss_backward", TORCH_BOX(&value_loss_backward_cpu));
}

}  // namespace ppokernels::CPU_CAPABILITY
