// Host-side setup of the kl family, written once for the CPU (cpu/kl.cpp) and CUDA (cuda/kl.cu)
// front ends: argument checks, estimator parsing, contiguity and output allocation. Those files
// keep only the dtype dispatch, the launch and the registration.
#pragma once
#include <optional>
#include <string>

#include "ppokernels/aten_utils.h"
#include "ppokernels/kl.h"

namespace ppokernels {

struct KLArgs {
  at::Tensor lp, ref;     // contiguous, the input dtype
  at::Tensor g;           // backward only: upstream gradient in the accumulation dtype
  at::Tensor out;         // forward: the estimator [same shape], fp32 (fp64 for fp64);
                          // backward: d/d logprobs, the input dtype
  KLEstimator est;
  bool straight_through;  // a "+" estimator: the value of `est`, the gradient of k2
  double clamp;           // 0: none
};

// grad is null for the forward (op kl_penalty), set for the backward (kl_penalty_backward).
inline KLArgs kl_args(const char* op, const at::Tensor& logprobs, const at::Tensor& ref_logprobs,
                      const std::string& estimator, std::optional<double> clamp,
                      const at::Tensor* grad) {
  KLArgs a;
  TORCH_CHECK(parse_kl_estimator(estimator.c_str(), &a.est, &a.straight_through), op,
              ": unknown estimator '", estimator,
              "' (expected k1, k2, k3 or abs, optionally with a '+' suffix)");
  TORCH_CHECK(logprobs.sizes() == ref_logprobs.sizes(), op,
              ": logprobs and ref_logprobs must have the same shape");
  TORCH_CHECK(logprobs.scalar_type() == ref_logprobs.scalar_type(), op,
              ": logprobs and ref_logprobs must have the same dtype");
  TORCH_CHECK(ref_logprobs.device() == logprobs.device(), op,
              ": logprobs and ref_logprobs must be on the same device");
  a.lp = logprobs.contiguous();
  a.ref = ref_logprobs.contiguous();
  a.clamp = clamp.value_or(0.0);
  if (grad) {
    TORCH_CHECK(grad->sizes() == logprobs.sizes(), op, ": grad must have the shape of logprobs");
    a.g = grad->to(acc_dtype(a.lp)).contiguous();
    a.out = at::empty_like(a.lp);
  } else {
    a.out = at::empty(a.lp.sizes(), a.lp.options().dtype(acc_dtype(a.lp)));
  }
  return a;
}

}  // namespace ppokernels
