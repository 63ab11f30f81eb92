// CPU kernels of the kl family: per-token KL estimators, forward and backward.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ppokernels/cpu_vec.h"
#include "ppokernels/kl.h"

namespace ppokernels {
namespace {

constexpr int64_t kGrain = 16384;

void check_inputs(const char* op, const at::Tensor& logprobs, const at::Tensor& ref_logprobs,
                  const std::string& estimator, KLEstimator* est, bool* st) {
  TORCH_CHECK(parse_kl_estimator(estimator.c_str(), est, st), op, ": unknown estimator '",
              estimator, "' (expected k1, k2, k3 or abs, optionally with a '+' suffix)");
  TORCH_CHECK(logprobs.sizes() == ref_logprobs.sizes(), op,
              ": logprobs and ref_logprobs must have the same shape");
  TORCH_CHECK(logprobs.scalar_type() == ref_logprobs.scalar_type(), op,
              ": logprobs and ref_logprobs must have the same dtype");
}

// y[i] = f(a[i], b[i], extra[i]) over [begin, end): SIMD for float inputs, scalar otherwise.
// `f` is generic over the element type (float, double or VecF).
template <typename scalar_t, typename acc_t, typename out_t, typename F>
void map3(const scalar_t* a, const scalar_t* b, const acc_t* c, out_t* y, int64_t begin,
          int64_t end, F f) {
  int64_t i = begin;
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<out_t, float>) {
    for (; i + VecF::size() <= end; i += VecF::size()) {
      const VecF cv = c ? VecF::loadu(c + i) : VecF(0.f);
      f(VecF::loadu(a + i), VecF::loadu(b + i), cv).store(y + i);
    }
  }
  for (; i < end; ++i) {
    y[i] = static_cast<out_t>(f(acc_t(a[i]), acc_t(b[i]), c ? c[i] : acc_t(0)));
  }
}

}  // namespace

at::Tensor kl_penalty_cpu(const at::Tensor& logprobs, const at::Tensor& ref_logprobs,
                          const std::string& estimator, std::optional<double> clamp) {
  KLEstimator est;
  bool st;
  check_inputs("kl_penalty", logprobs, ref_logprobs, estimator, &est, &st);
  const auto lp = logprobs.contiguous();
  const auto ref = ref_logprobs.contiguous();
  // fp32 output for fp32/bf16/fp16 inputs, fp64 for fp64 (gradcheck)
  const auto out_dtype = lp.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto out = at::empty(lp.sizes(), lp.options().dtype(out_dtype));
  const double c = clamp.value_or(0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lp.scalar_type(), "kl_penalty_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* a = lp.data_ptr<scalar_t>();
    const scalar_t* b = ref.data_ptr<scalar_t>();
    acc_t* y = out.data_ptr<acc_t>();
    at::parallel_for(0, lp.numel(), kGrain, [&](int64_t begin, int64_t end) {
      map3<scalar_t, acc_t>(a, b, static_cast<const acc_t*>(nullptr), y, begin, end,
                            [&](auto x1, auto x2, auto) { return kl_value(x1 - x2, est, c); });
    });
  });
  return out;
}

// Gradient with respect to logprobs; the gradient with respect to ref_logprobs is its negative.
at::Tensor kl_penalty_backward_cpu(const at::Tensor& grad, const at::Tensor& logprobs,
                                   const at::Tensor& ref_logprobs, const std::string& estimator,
                                   std::optional<double> clamp) {
  KLEstimator est;
  bool st;
  check_inputs("kl_penalty_backward", logprobs, ref_logprobs, estimator, &est, &st);
  TORCH_CHECK(grad.sizes() == logprobs.sizes(), "kl_penalty_backward: grad has the wrong shape");
  const auto lp = logprobs.contiguous();
  const auto ref = ref_logprobs.contiguous();
  const auto out_dtype = lp.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto g = grad.to(out_dtype).contiguous();
  auto grad_lp = at::empty_like(lp);
  const double c = clamp.value_or(0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lp.scalar_type(), "kl_penalty_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* a = lp.data_ptr<scalar_t>();
    const scalar_t* b = ref.data_ptr<scalar_t>();
    const acc_t* gy = g.data_ptr<acc_t>();
    scalar_t* gx = grad_lp.data_ptr<scalar_t>();
    at::parallel_for(0, lp.numel(), kGrain, [&](int64_t begin, int64_t end) {
      map3<scalar_t, acc_t>(a, b, gy, gx, begin, end, [&](auto x1, auto x2, auto gv) {
        return gv * kl_grad(x1 - x2, est, c, st);
      });
    });
  });
  return grad_lp;
}

TORCH_LIBRARY_IMPL(ppokernels, CPU, m) {
  m.impl("kl_penalty", &kl_penalty_cpu);
  m.impl("kl_penalty_backward", &kl_penalty_backward_cpu);
}

}  // namespace ppokernels
