// Host-side setup of the advantages family (masked moments, masked whitening, group baselines),
// written once for the CPU (cpu/advantages*.cpp) and CUDA (cuda/advantages*.cu) front ends:
// argument checks, estimator parsing, contiguity and output allocation. Those files keep only
// the dtype dispatch, the launch and the registration.
#pragma once
#include <string>

#include "ppokernels/advantages.h"
#include "ppokernels/stable.h"

namespace ppokernels {

// ------------------------------------------------------------------ masked moments / whitening
struct MaskedArgs {
  Tensor x, m;  // contiguous x, bool mask
  Tensor g;     // backward only: upstream gradient in the accumulation dtype
  Tensor out;   // allocated by the caller of masked_args (shapes differ per op)
};

// grad null for the forwards; for the backward of masked_whiten it has the shape of x.
inline MaskedArgs masked_args(const char* op, const Tensor& x, const Tensor& mask,
                              const Tensor* grad) {
  PPK_CHECK(is_floating_type(x.scalar_type()), op, ": x must be a floating tensor");
  PPK_CHECK(same_shape(x, mask), op, ": mask must have the shape of x");
  PPK_CHECK(same_device(mask, x), op, ": mask is on another device than x");
  MaskedArgs a;
  a.x = as_contiguous(x);
  a.m = bool_mask(mask);
  if (grad) a.g = as_contiguous(to_dtype(*grad, acc_dtype(x)));
  return a;
}

// masked_moments_backward: grad and moments are the 3 entries (mean, var, count).
inline MaskedArgs moments_backward_args(const Tensor& grad, const Tensor& x,
                                        const Tensor& mask, const Tensor& moments) {
  const char* op = "masked_moments_backward";
  PPK_CHECK(grad.numel() == 3 && moments.numel() == 3, op,
            ": grad and moments must have 3 entries");
  MaskedArgs a = masked_args(op, x, mask, &grad);
  a.out = empty_as(a.x);
  return a;
}

inline MaskedArgs whiten_args(const Tensor& x, const Tensor& mask) {
  MaskedArgs a = masked_args("masked_whiten", x, mask, nullptr);
  a.out = empty(sizes_of(a.x), acc_dtype(x), a.x);
  return a;
}

inline MaskedArgs whiten_backward_args(const Tensor& grad, const Tensor& x,
                                       const Tensor& mask) {
  const char* op = "masked_whiten_backward";
  PPK_CHECK(same_shape(grad, x), op, ": grad must have the shape of x");
  MaskedArgs a = masked_args(op, x, mask, &grad);
  a.out = empty_as(a.x);
  return a;
}

// ------------------------------------------------------------------------------ group baselines
struct GroupArgs {
  Tensor s, ids;  // contiguous scores, int64 group ids
  Tensor g;       // backward only: upstream gradient in the accumulation dtype
  Tensor out;     // forward: advantages (fp32, fp64 for fp64); backward: d scores
  GroupEstimator est;
};

inline GroupArgs group_args(const char* op, const Tensor& scores, const Tensor& ids,
                            int64_t num_groups, const std::string& estimator,
                            const Tensor* grad) {
  GroupArgs a;
  PPK_CHECK(parse_group_estimator(estimator.c_str(), &a.est), op, ": unknown estimator '",
            estimator, "' (expected grpo or rloo)");
  PPK_CHECK(scores.dim() == 1 && ids.dim() == 1 && scores.size(0) == ids.size(0), op,
            ": scores and group_ids must be 1-D of the same length");
  PPK_CHECK(ids.scalar_type() == kLong, op, ": group_ids must be int64");
  PPK_CHECK(same_device(ids, scores), op, ": group_ids is on another device");
  PPK_CHECK(num_groups >= 0, op, ": num_groups must be >= 0");
  a.s = as_contiguous(scores);
  a.ids = as_contiguous(ids);
  if (grad) {
    PPK_CHECK(same_shape(*grad, scores), op, ": grad has the wrong shape");
    a.g = as_contiguous(to_dtype(*grad, acc_dtype(a.s)));
    a.out = empty_as(a.s);
  } else {
    a.out = empty(sizes_of(a.s), acc_dtype(a.s), a.s);
  }
  return a;
}

}  // namespace ppokernels
