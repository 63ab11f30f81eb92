// Host-side setup of group_advantages, written once for the CPU (cpu/group_advantages.cpp) and
// CUDA (cuda/group_advantages.cu) front ends: argument checks, estimator parsing, contiguity and
// output allocation. Those files keep only the dtype dispatch, the launch and the registration.
#pragma once
#include <string>

#include "ppokernels/group_advantages.h"
#include "ppokernels/stable.h"

namespace ppokernels {

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
