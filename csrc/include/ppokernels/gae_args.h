// Host-side setup of the gae family (gae, discounted_returns and their backward passes), written
// once for the CPU (cpu/gae.cpp) and CUDA (cuda/gae.cu) front ends: argument checks, mask-mode
// parsing, contiguity and output allocation. Those files keep only the dtype dispatch, the launch
// and the registration.
#pragma once
#include <optional>
#include <string>

#include "ppokernels/aten_utils.h"
#include "ppokernels/gae.h"

namespace ppokernels {

// Rows of the scans: n rows of len steps each (time is the last dimension).
struct GaeRows {
  int64_t n, len;
  MaskMode mode;
};

inline GaeRows gae_check(const char* op, const at::Tensor& x, const at::Tensor& mask,
                         const std::string& mode_name, double gamma, double lam) {
  GaeRows r;
  TORCH_CHECK(parse_mask_mode(mode_name.c_str(), &r.mode), op,
              ": mode must be 'skip' or 'zero', got '", mode_name, "'");
  TORCH_CHECK(x.dim() >= 1, op, ": inputs must have a time dimension");
  TORCH_CHECK(mask.sizes() == x.sizes(), op, ": mask must have the shape of the inputs");
  TORCH_CHECK(mask.device() == x.device(), op, ": mask must be on the device of the inputs");
  TORCH_CHECK(gamma >= 0.0 && gamma <= 1.0, op, ": gamma must be in [0, 1]");
  TORCH_CHECK(lam >= 0.0 && lam <= 1.0, op, ": lam must be in [0, 1]");
  r.len = x.size(-1);
  r.n = r.len == 0 ? 0 : x.numel() / r.len;
  return r;
}

// Forward of gae (values given) or discounted_returns (values null): outputs in fp32 (fp64 for
// fp64 rewards); ret is undefined for discounted_returns, whose result is adv.
struct GaeForwardArgs {
  GaeRows rows;
  at::Tensor r, v, m;  // rewards, values (or undefined), bool mask; contiguous
  at::Tensor adv, ret;
};

inline GaeForwardArgs gae_forward_args(const char* op, const at::Tensor& rewards,
                                       const at::Tensor* values, const at::Tensor& mask,
                                       double gamma, double lam, const std::string& mode_name) {
  GaeForwardArgs a;
  a.rows = gae_check(op, rewards, mask, mode_name, gamma, lam);
  if (values) {
    TORCH_CHECK(values->sizes() == rewards.sizes(), op, ": values must have the shape of rewards");
    TORCH_CHECK(values->scalar_type() == rewards.scalar_type(), op,
                ": values and rewards dtypes differ");
    TORCH_CHECK(values->device() == rewards.device(), op,
                ": values must be on the device of rewards");
    a.v = values->contiguous();
  }
  a.r = rewards.contiguous();
  a.m = bool_mask(mask);
  a.adv = at::empty(a.r.sizes(), a.r.options().dtype(acc_dtype(a.r)));
  if (values) a.ret = at::empty_like(a.adv);
  return a;
}

// Backward: upstream gradients in the accumulation dtype of `dtype` (the rewards' dtype), the
// input gradients in `dtype`. grad_advantages null for discounted_returns (grad_v undefined).
struct GaeBackwardArgs {
  GaeRows rows;
  at::Tensor ga, gr, m;  // grad_advantages (or undefined), grad_returns, bool mask
  at::Tensor grad_r, grad_v;
};

inline GaeBackwardArgs gae_backward_args(const char* op, const at::Tensor* grad_advantages,
                                         const at::Tensor& grad_returns, const at::Tensor& mask,
                                         double gamma, double lam, const std::string& mode_name,
                                         at::ScalarType dtype) {
  GaeBackwardArgs a;
  a.rows = gae_check(op, grad_returns, mask, mode_name, gamma, lam);
  const auto acc = acc_dtype(dtype);
  if (grad_advantages) {
    TORCH_CHECK(grad_advantages->sizes() == grad_returns.sizes(), op,
                ": grad_advantages and grad_returns must have the same shape");
    a.ga = grad_advantages->to(acc).contiguous();
  }
  a.gr = grad_returns.to(acc).contiguous();
  a.m = bool_mask(mask);
  a.grad_r = at::empty(a.gr.sizes(), a.gr.options().dtype(dtype));
  if (grad_advantages) a.grad_v = at::empty_like(a.grad_r);
  return a;
}

}  // namespace ppokernels
