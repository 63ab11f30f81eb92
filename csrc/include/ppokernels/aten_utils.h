// Torch-side helpers shared by the CPU and CUDA glue code (host only).
#pragma once
#include <ATen/ATen.h>

namespace ppokernels {

// Accumulation and output dtype of the kernels: float64 for float64 inputs, else float32.
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}
inline at::ScalarType acc_dtype(const at::Tensor& x) { return acc_dtype(x.scalar_type()); }

// A contiguous bool mask from a {0, 1} mask of any dtype (no copy when it already is one).
inline at::Tensor bool_mask(const at::Tensor& mask) {
  return (mask.scalar_type() == at::kBool ? mask : mask.ne(0)).contiguous();
}

}  // namespace ppokernels
