// Host-side setup of the advantages family (masked moments, masked whitening, group baselines),
// written once for the CPU (cpu/advantages*.cpp) and CUDA (cuda/advantages*.cu) front ends:
// argument checks, estimator parsing, contiguity and output allocation. Those files keep only
// the dtype dispatch, the launch and the registration.
#pragma once
#include <string>

#include "ppokernels/advantages.h"
#include "ppokernels/aten_utils.h"

namespace ppokernels {

// ------------------------------------------------------------------ masked moments / whitening
struct MaskedArgs {
  at::Tensor x, m;  // contiguous x, bool mask
  at::Tensor g;     // backward only: upstream gradient in the accumulation dtype
  at::Tensor out;   // allocated by the caller of masked_args (shapes differ per op)
};

// grad null for the forwards; for the backward of masked_whiten it has the shape of x.
inline MaskedArgs masked_args(const char* op, const at::Tensor& x, const at::Tensor& mask,
                              const at::Tensor* grad) {
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be a floating tensor");
  TORCH_CHECK(x.sizes() == mask.sizes(), op, ": mask must have the shape of x");
  TORCH_CHECK(mask.device() == x.device(), op, ": mask is on another device than x");
  MaskedArgs a;
  a.x = x.contiguous();
  a.m = bool_mask(mask);
  if (grad) a.g = grad->to(acc_dtype(x)).contiguous();
  return a;
}

// masked_moments_backward: grad and moments are the 3 entries (mean, var, count).
inline MaskedArgs moments_backward_args(const at::Tensor& grad, const at::Tensor& x,
                                        const at::Tensor& mask, const at::Tensor& moments) {
  const char* op = "masked_moments_backward";
  TORCH_CHECK(grad.numel() == 3 && moments.numel() == 3, op,
              ": grad and moments must have 3 entries");
  MaskedArgs a = masked_args(op, x, mask, &grad);
  a.out = at::empty_like(a.x);
  return a;
}

inline MaskedArgs whiten_args(const at::Tensor& x, const at::Tensor& mask) {
  MaskedArgs a = masked_args("masked_whiten", x, mask, nullptr);
  a.out = at::empty(a.x.sizes(), a.x.options().dtype(acc_dtype(x)));
  return a;
}

inline MaskedArgs whiten_backward_args(const at::Tensor& grad, const at::Tensor& x,
                                       const at::Tensor& mask) {
  const char* op = "masked_whiten_backward";
  TORCH_CHECK(grad.sizes() == x.sizes(), op, ": grad must have the shape of x");
  MaskedArgs a = masked_args(op, x, mask, &grad);
  a.out = at::empty_like(a.x);
  return a;
}

// ------------------------------------------------------------------------------ group baselines
struct GroupArgs {
  at::Tensor s, ids;  // contiguous scores, int64 group ids
  at::Tensor g;       // backward only: upstream gradient in the accumulation dtype
  at::Tensor out;     // forward: advantages (fp32, fp64 for fp64); backward: d scores
  GroupEstimator est;
};

inline GroupArgs group_args(const char* op, const at::Tensor& scores, const at::Tensor& ids,
                            int64_t num_groups, const std::string& estimator,
                            const at::Tensor* grad) {
  GroupArgs a;
  TORCH_CHECK(parse_group_estimator(estimator.c_str(), &a.est), op, ": unknown estimator '",
              estimator, "' (expected grpo or rloo)");
  TORCH_CHECK(scores.dim() == 1 && ids.dim() == 1 && scores.size(0) == ids.size(0), op,
              ": scores and group_ids must be 1-D of the same length");
  TORCH_CHECK(ids.scalar_type() == at::kLong, op, ": group_ids must be int64");
  TORCH_CHECK(ids.device() == scores.device(), op, ": group_ids is on another device");
  TORCH_CHECK(num_groups >= 0, op, ": num_groups must be >= 0");
  a.s = scores.contiguous();
  a.ids = ids.contiguous();
  if (grad) {
    TORCH_CHECK(grad->sizes() == scores.sizes(), op, ": grad has the wrong shape");
    a.g = grad->to(acc_dtype(a.s)).contiguous();
    a.out = at::empty_like(a.s);
  } else {
    a.out = at::empty(a.s.sizes(), a.s.options().dtype(acc_dtype(a.s)));
  }
  return a;
}

}  // namespace ppokernels
