// CPU kernels of the kl family: per-token KL estimators, forward and backward. Setup (checks,
// parsing, allocation) in ppokernels/kl_penalty_args.h, the math of one token in ppokernels/kl_penalty.h.
#include "ppokernels/cpu_isa.h"
#include "ppokernels/cpu_vec.h"
#include "ppokernels/kl_penalty_args.h"

namespace ppokernels::CPU_CAPABILITY {
namespace {

// y[i] = f(a[i], b[i], c[i]) over [begin, end), c may be null (read as 0): SIMD for float
// inputs, scalar otherwise. `f` is generic over the element type (float, double or SimdF).
template <typename scalar_t, typename acc_t, typename out_t, typename F>
void map3(const scalar_t* a, const scalar_t* b, const acc_t* c, out_t* y, int64_t begin,
          int64_t end, F f) {
  int64_t i = begin;
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<out_t, float>) {
    for (; i + kVecF <= end; i += kVecF) {
      const SimdF cv = c ? vload<SimdF>(c + i) : SimdF(0.f);
      vstore(y + i, f(vload<SimdF>(a + i), vload<SimdF>(b + i), cv));
    }
  }
  for (; i < end; ++i) {
    y[i] = static_cast<out_t>(f(acc_t(a[i]), acc_t(b[i]), c ? c[i] : acc_t(0)));
  }
}

// One token of an estimator costs an exp or a log1p (about 20 vector operations) on top of its
// 12-16 bytes, so it counts as kTokenCost element-operations when choosing the thread count: a
// 64 x 2048 input is split across threads (one thread took 1.6x torch.compile's two).
constexpr int64_t kTokenCost = 4;

}  // namespace

Tensor kl_penalty_cpu(const Tensor& logprobs, const Tensor& ref_logprobs,
                          const std::string& estimator, std::optional<double> clamp) {
  const KLArgs k = kl_args("kl_penalty", logprobs, ref_logprobs, estimator, clamp, nullptr);
  PPK_DISPATCH_FLOATING(k.lp.scalar_type(), "kl_penalty_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* a = k.lp.const_data_ptr<scalar_t>();
    const scalar_t* b = k.ref.const_data_ptr<scalar_t>();
    acc_t* y = k.out.mutable_data_ptr<acc_t>();
    parallel_for_work(k.lp.numel(), kTokenCost, [&](int64_t begin, int64_t end) {
      map3<scalar_t, acc_t>(a, b, static_cast<const acc_t*>(nullptr), y, begin, end,
                            [&](auto x1, auto x2, auto) { return kl_value(x1 - x2, k.est, k.clamp); });
    });
  });
  return k.out;
}

// Gradient with respect to logprobs; the gradient with respect to ref_logprobs is its negative.
Tensor kl_penalty_backward_cpu(const Tensor& grad, const Tensor& logprobs,
                                   const Tensor& ref_logprobs, const std::string& estimator,
                                   std::optional<double> clamp) {
  const KLArgs k = kl_args("kl_penalty_backward", logprobs, ref_logprobs, estimator, clamp, &grad);
  PPK_DISPATCH_FLOATING(k.lp.scalar_type(), "kl_penalty_bwd_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* a = k.lp.const_data_ptr<scalar_t>();
    const scalar_t* b = k.ref.const_data_ptr<scalar_t>();
    const acc_t* gy = k.g.const_data_ptr<acc_t>();
    scalar_t* gx = k.out.mutable_data_ptr<scalar_t>();
    parallel_for_work(k.lp.numel(), kTokenCost, [&](int64_t begin, int64_t end) {
      map3<scalar_t, acc_t>(a, b, gy, gx, begin, end, [&](auto x1, auto x2, auto gv) {
        return gv * kl_grad(x1 - x2, k.est, k.clamp, k.straight_through);
      });
    });
  });
  return k.out;
}

// This level's kernels, registered by csrc/cpu_isa.cpp when the running CPU selects the level.
void register_kl_penalty(Library& m) {
  m.impl("kl_penalty", TORCH_BOX(&kl_penalty_cpu));
  m.impl("kl_penalty_backward", TORCH_BOX(&kl_penalty_backward_cpu));
}

}  // namespace ppokernels::CPU_CAPABILITY
