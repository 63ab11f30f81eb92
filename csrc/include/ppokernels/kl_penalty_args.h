// Host-side setup of the kl family, written once for the CPU (cpu/kl_penalty.cpp) and CUDA (cuda/kl_penalty.cu)
// front ends: argument checks, estimator parsing, contiguity and output allocation. Those files
// keep only the dtype dispatch, the launch and the registration.
#pragma once
#include <optional>
#include <string>

#include "ppokernels/stable.h"
#include "ppokernels/kl_penalty.h"

namespace ppokernels {

struct KLArgs {
  Tensor lp, ref;     // contiguous, the input dtype
  Tensor g;           // backward only: upstream gradient in the accumulation dtype
  Tensor out;         // forward: the estimator [same shape], fp32 (fp64 for fp64);
                          // backward: d/d logprobs, the input dtype
  KLEstimator est;
  bool straight_through;  // a "+" estimator: the value of `est`, the gradient of k2
  double clamp;           // 0: none
};

// grad is null for the forward (op kl_penalty), set for the backward (kl_penalty_backward).
inline KLArgs kl_args(const char* op, const Tensor& logprobs, const Tensor& ref_logprobs,
                      const std::string& estimator, std::optional<double> clamp,
                      const Tensor* grad) {
  KLArgs a;
  PPK_CHECK(parse_kl_estimator(estimator.c_str(), &a.est, &a.straight_through), op,
            ": unknown estimator '", estimator,
            "' (expected k1, k2, k3 or abs, optionally with a '+' suffix)");
  PPK_CHECK(same_shape(logprobs, ref_logprobs), op,
            ": logprobs and ref_logprobs must have the same shape");
  PPK_CHECK(logprobs.scalar_type() == ref_logprobs.scalar_type(), op,
            ": logprobs and ref_logprobs must have the same dtype");
  PPK_CHECK(same_device(ref_logprobs, logprobs), op,
            ": logprobs and ref_logprobs must be on the same device");
  a.lp = as_contiguous(logprobs);
  a.ref = as_contiguous(ref_logprobs);
  a.clamp = clamp.value_or(0.0);
  if (grad) {
    PPK_CHECK(same_shape(*grad, logprobs), op, ": grad must have the shape of logprobs");
    a.g = as_contiguous(to_dtype(*grad, acc_dtype(a.lp)));
    a.out = empty_as(a.lp);
  } else {
    a.out = empty(sizes_of(a.lp), acc_dtype(a.lp), a.lp);
  }
  return a;
}

}  // namespace ppokernels
