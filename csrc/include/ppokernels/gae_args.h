// Host-side setup of the gae family (gae, discounted_returns and their backward passes), written
// once for the CPU (cpu/gae.cpp) and CUDA (cuda/gae.cu) front ends: argument checks, mask-mode
// parsing, contiguity and output allocation. Those files keep only the dtype dispatch, the launch
// and the registration.
#pragma once
#include <optional>
#include <string>

#include "ppokernels/stable.h"
#include "ppokernels/gae.h"

namespace ppokernels {

// Rows of the scans: n rows of len steps each (time is the last dimension).
struct GaeRows {
  int64_t n, len;
  MaskMode mode;
};

inline GaeRows gae_check(const char* op, const Tensor& x, const Tensor& mask,
                         const std::string& mode_name, double gamma, double lam) {
  GaeRows r;
  PPK_CHECK(parse_mask_mode(mode_name.c_str(), &r.mode), op,
            ": mode must be 'skip' or 'zero', got '", mode_name, "'");
  PPK_CHECK(x.dim() >= 1, op, ": inputs must have a time dimension");
  PPK_CHECK(same_shape(mask, x), op, ": mask must have the shape of the inputs");
  PPK_CHECK(same_device(mask, x), op, ": mask must be on the device of the inputs");
  PPK_CHECK(gamma >= 0.0 && gamma <= 1.0, op, ": gamma must be in [0, 1]");
  PPK_CHECK(lam >= 0.0 && lam <= 1.0, op, ": lam must be in [0, 1]");
  r.len = x.size(-1);
  r.n = r.len == 0 ? 0 : x.numel() / r.len;
  return r;
}

// Forward of gae (values given) or discounted_returns (values null): outputs in fp32 (fp64 for
// fp64 rewards); ret is undefined for discounted_returns, whose result is adv.
struct GaeForwardArgs {
  GaeRows rows;
  Tensor r, v, m;  // rewards, values (or undefined), bool mask; contiguous
  Tensor adv, ret;
};

inline GaeForwardArgs gae_forward_args(const char* op, const Tensor& rewards,
                                       const Tensor* values, const Tensor& mask,
                                       double gamma, double lam, const std::string& mode_name) {
  GaeForwardArgs a;
  a.rows = gae_check(op, rewards, mask, mode_name, gamma, lam);
  if (values) {
    PPK_CHECK(same_shape(*values, rewards), op, ": values must have the shape of rewards");
    PPK_CHECK(values->scalar_type() == rewards.scalar_type(), op,
              ": values and rewards dtypes differ");
    PPK_CHECK(same_device(*values, rewards), op,
              ": values must be on the device of rewards");
    a.v = as_contiguous(*values);
  }
  a.r = as_contiguous(rewards);
  a.m = bool_mask(mask);
  a.adv = empty(sizes_of(a.r), acc_dtype(a.r), a.r);
  if (values) a.ret = empty_as(a.adv);
  return a;
}

// Backward: upstream gradients in the accumulation dtype of `dtype` (the rewards' dtype), the
// input gradients in `dtype`. grad_advantages null for discounted_returns (grad_v undefined).
struct GaeBackwardArgs {
  GaeRows rows;
  Tensor ga, gr, m;  // grad_advantages (or undefined), grad_returns, bool mask
  Tensor grad_r, grad_v;
};

inline GaeBackwardArgs gae_backward_args(const char* op, const Tensor* grad_advantages,
                                         const Tensor& grad_returns, const Tensor& mask,
                                         double gamma, double lam, const std::string& mode_name,
                                         ScalarType dtype) {
  GaeBackwardArgs a;
  a.rows = gae_check(op, grad_returns, mask, mode_name, gamma, lam);
  const auto acc = acc_dtype(dtype);
  if (grad_advantages) {
    PPK_CHECK(same_shape(*grad_advantages, grad_returns), op,
              ": grad_advantages and grad_returns must have the same shape");
    a.ga = as_contiguous(to_dtype(*grad_advantages, acc));
  }
  a.gr = as_contiguous(to_dtype(grad_returns, acc));
  a.m = bool_mask(mask);
  a.grad_r = empty(sizes_of(a.gr), dtype, a.gr);
  if (grad_advantages) a.grad_v = empty_as(a.grad_r);
  return a;
}

}  // namespace ppokernels
