// Host-side setup of masked moments and whitening, written once for the CPU
// (cpu/masked_whiten.cpp) and CUDA (cuda/masked_whiten.cu) front ends: argument checks,
// contiguity and output allocation. Those files keep only
// the dtype dispatch, the launch and the registration.
#pragma once
#include <string>

#include "ppokernels/masked_whiten.h"
#include "ppokernels/stable.h"

namespace ppokernels {

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

}  // namespace ppokernels
