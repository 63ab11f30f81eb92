// Host-side setup of value_loss and its backward, written once for the CPU (cpu/value_loss.cpp)
// and CUDA (cuda/value_loss.cu) front ends: argument checks (agg in agg_args.h), contiguity and
// the gradient output. Those files keep only the dtype dispatch, the launch and the registration.
#pragma once
#include <optional>

#include "ppokernels/agg_args.h"
#include "ppokernels/stable.h"
#include "ppokernels/value_loss.h"

namespace ppokernels {

struct ValueArgs {
  int64_t B, T;
  Tensor v, vo;  // [B, T], input dtype
  Tensor ret;    // [B, T], accumulation dtype
  Tensor mask;   // [B, T] bool
  double clip;       // 0: none
};

inline ValueArgs value_args(const char* op, const Tensor& values, const Tensor& old_values,
                            const Tensor& returns, const Tensor& mask,
                            std::optional<double> clip) {
  ValueArgs c;
  ppo_check_2d(op, values, mask, &c.B, &c.T);
  ppo_check_like(op, "old_values", old_values, values);
  c.v = as_contiguous(values);
  c.vo = as_contiguous(old_values);
  bool per_row;
  c.ret = ppo_token_or_row(op, "returns", returns, c.B, c.T, acc_dtype(values), &per_row);
  PPK_CHECK(!per_row, op, ": returns must have shape [B, T]");
  c.mask = bool_mask(mask);
  PPK_CHECK(!clip || *clip > 0, op, ": clip must be > 0");
  c.clip = clip.value_or(0.0);
  return c;
}

inline Tensor value_grad_output(const char* op, const ValueArgs& c, const Tensor& grad,
                                const Tensor& row_scale) {
  PPK_CHECK(row_scale.dim() == 1 && row_scale.size(0) == c.B, op, ": row_scale must be [B]");
  PPK_CHECK(grad.numel() == 1, op, ": grad must be a scalar");
  return empty_as(c.v);
}

}  // namespace ppokernels
