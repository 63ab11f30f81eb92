// CPU kernels of group_advantages: GRPO, Dr.GRPO and RLOO advantages
// (forward, backward), per group statistics accumulated sequentially in index order
// (deterministic; a few microseconds at RL batch sizes). Setup in ppokernels/group_advantages_args.h,
// math in ppokernels/group_advantages.h.
#include <vector>

#include "ppokernels/cpu_isa.h"
#include "ppokernels/group_advantages_args.h"

namespace ppokernels::CPU_CAPABILITY {
namespace {

// Per-group count, sum and centred sum of squares (and of g when given), sequentially in index
// order: deterministic, and a few microseconds at RL batch sizes.
template <typename scalar_t>
std::vector<GroupCoefs> group_pass(const scalar_t* s, const int64_t* ids, int64_t b,
                                   int64_t num_groups, GroupEstimator est, double eps,
                                   bool norm_by_std, std::vector<double>* count) {
  using acc_t = acc_type<scalar_t>;
  std::vector<acc_t> sum(num_groups, 0), sq(num_groups, 0);
  count->assign(num_groups, 0.0);
  for (int64_t i = 0; i < b; ++i) {
    const int64_t k = ids[i];
    PPK_CHECK(k >= 0 && k < num_groups, "group_advantages: group id ", k, " out of range");
    (*count)[k] += 1.0;
    sum[k] += acc_t(s[i]);
  }
  std::vector<acc_t> mean(num_groups);
  for (int64_t k = 0; k < num_groups; ++k) mean[k] = acc_t(sum[k] / acc_t((*count)[k]));
  for (int64_t i = 0; i < b; ++i) {
    const acc_t d = acc_t(s[i]) - mean[ids[i]];
    sq[ids[i]] += d * d;
  }
  std::vector<GroupCoefs> c(num_groups);
  for (int64_t k = 0; k < num_groups; ++k) {
    c[k] = group_coefs((*count)[k], double(sum[k]), double(sq[k]), est, eps, norm_by_std);
  }
  return c;
}

}  // namespace

Tensor group_advantages_cpu(const Tensor& scores, const Tensor& group_ids, int64_t num_groups,
                            const std::string& estimator, double eps, bool norm_by_std) {
  const GroupArgs a = group_args("group_advantages", scores, group_ids, num_groups, estimator,
                                 nullptr);
  const auto &s = a.s, &ids = a.ids, &out = a.out;
  const GroupEstimator est = a.est;
  PPK_DISPATCH_FLOATING(s.scalar_type(), "group_adv", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    const int64_t* ip = ids.const_data_ptr<int64_t>();
    std::vector<double> count;
    const auto c = group_pass(sp, ip, s.numel(), num_groups, est, eps, norm_by_std, &count);
    acc_t* o = out.mutable_data_ptr<acc_t>();
    for (int64_t i = 0; i < s.numel(); ++i) {
      const GroupCoefs& k = c[ip[i]];
      o[i] = (acc_t(sp[i]) - acc_t(k.center)) * acc_t(k.scale);
    }
  });
  return a.out;
}

Tensor group_advantages_backward_cpu(const Tensor& grad, const Tensor& scores,
                                     const Tensor& group_ids, int64_t num_groups,
                                     const std::string& estimator, double eps, bool norm_by_std) {
  const GroupArgs a = group_args("group_advantages_backward", scores, group_ids, num_groups,
                                 estimator, &grad);
  const auto &s = a.s, &ids = a.ids, &g = a.g, &ds = a.out;
  const GroupEstimator est = a.est;
  PPK_DISPATCH_FLOATING(s.scalar_type(), "group_adv_bwd", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    const int64_t* ip = ids.const_data_ptr<int64_t>();
    const acc_t* gp = g.const_data_ptr<acc_t>();
    std::vector<double> count;
    const auto c = group_pass(sp, ip, s.numel(), num_groups, est, eps, norm_by_std, &count);
    std::vector<acc_t> sg(num_groups, 0), sgd(num_groups, 0);
    for (int64_t i = 0; i < s.numel(); ++i) {
      sg[ip[i]] += gp[i];
      sgd[ip[i]] += gp[i] * (acc_t(sp[i]) - acc_t(c[ip[i]].mean));
    }
    std::vector<acc_t> cg(num_groups), ch(num_groups);
    for (int64_t k = 0; k < num_groups; ++k) {
      double a, b;
      group_grad_coefs(c[k], count[k], sg[k], sgd[k], est, norm_by_std, &a, &b);
      cg[k] = acc_t(a);
      ch[k] = acc_t(b);
    }
    scalar_t* o = ds.mutable_data_ptr<scalar_t>();
    for (int64_t i = 0; i < s.numel(); ++i) {
      const int64_t k = ip[i];
      const acc_t d = acc_t(sp[i]) - acc_t(c[k].mean);
      o[i] = static_cast<scalar_t>(acc_t(c[k].scale) * gp[i] - cg[k] - ch[k] * d);
    }
  });
  return a.out;
}

// This level's kernels, registered by csrc/cpu_isa.cpp when the running CPU selects the level.
void register_group_advantages(Library& m) {
  m.impl("group_advantages", TORCH_BOX(&group_advantages_cpu));
  m.impl("group_advantages_backward", TORCH_BOX(&group_advantages_backward_cpu));
}

}  // namespace ppokernels::CPU_CAPABILITY
