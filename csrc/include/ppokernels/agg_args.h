// Host-side setup shared by the two losses (ppo_policy_loss_args.h, value_loss_args.h): the
// aggregation's name, and the checks of their [B, T] data, masks and per-token or per-row inputs.
#pragma once
#include <string>

#include "ppokernels/agg.h"
#include "ppokernels/stable.h"

namespace ppokernels {

inline AggMode ppo_agg_mode(const char* op, const std::string& agg) {
  AggMode mode;
  PPK_CHECK(parse_agg_mode(agg.c_str(), &mode), op, ": unknown agg '", agg, "'");
  return mode;
}

// x must match `like` (the [B, T] data) in shape, dtype and device.
inline void ppo_check_like(const char* op, const char* name, const Tensor& x,
                           const Tensor& like) {
  PPK_CHECK(same_shape(x, like), op, ": ", name, " must have the shape of the data");
  PPK_CHECK(x.scalar_type() == like.scalar_type(), op, ": ", name, " must have the data's dtype");
  PPK_CHECK(same_device(x, like), op, ": ", name, " must be on the data's device");
}

// advantages / is_weights / returns: [B, T] or [B], converted to the accumulation dtype.
inline Tensor ppo_token_or_row(const char* op, const char* name, const Tensor& x,
                               int64_t B, int64_t T, ScalarType acc, bool* per_row) {
  PPK_CHECK(is_floating_type(x.scalar_type()), op, ": ", name, " must be floating point");
  const bool full = x.dim() == 2 && x.size(0) == B && x.size(1) == T;
  *per_row = x.dim() == 1 && x.size(0) == B;
  PPK_CHECK(full || *per_row, op, ": ", name, " must have shape [B, T] or [B]");
  return as_contiguous(to_dtype(x, acc));
}

// [B, T] data with a mask of its shape.
inline void ppo_check_2d(const char* op, const Tensor& x, const Tensor& mask,
                         int64_t* B, int64_t* T) {
  PPK_CHECK(x.dim() == 2, op, ": inputs must be [B, T]");
  PPK_CHECK(same_shape(mask, x), op, ": mask must have the shape of the data");
  PPK_CHECK(same_device(mask, x), op, ": mask must be on the data's device");
  *B = x.size(0);
  *T = x.size(1);
}

}  // namespace ppokernels
