// CPU kernels of the gae family: GAE and discounted returns (reverse scans over each row, rows in
// parallel), and their backward passes (the transposed scans, forward in time).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ppokernels/aten_utils.h"
#include "ppokernels/gae.h"

namespace ppokernels {
namespace {

struct Rows {
  int64_t n, len;  // number of rows, length of a row (the time axis, last dimension)
};

Rows check(const char* op, const at::Tensor& x, const at::Tensor& mask, MaskMode* mode,
           const std::string& mode_name, double gamma, double lam) {
  TORCH_CHECK(parse_mask_mode(mode_name.c_str(), mode), op, ": mode must be 'skip' or 'zero', got '",
              mode_name, "'");
  TORCH_CHECK(x.dim() >= 1, op, ": inputs must have a time dimension");
  TORCH_CHECK(mask.sizes() == x.sizes(), op, ": mask must have the shape of the inputs");
  TORCH_CHECK(gamma >= 0.0 && gamma <= 1.0, op, ": gamma must be in [0, 1]");
  TORCH_CHECK(lam >= 0.0 && lam <= 1.0, op, ": lam must be in [0, 1]");
  const int64_t len = x.size(-1);
  return {len == 0 ? 0 : x.numel() / len, len};
}

int64_t row_grain(int64_t len) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(len, 1)); }

// Reverse scan of R rows [b, b + R) at once: the recursion of one row is a chain of dependent
// multiply-adds, so interleaving independent rows keeps the FMA units busy (about 3x faster
// than one row at a time).
template <int R, typename scalar_t, typename A>
void scan_rows(const scalar_t* rewards, const scalar_t* values, const bool* mask, A* advantages,
               A* returns, int64_t b, int64_t len, A gamma, A lam, MaskMode mode) {
  A nv[R] = {}, a[R] = {};
  for (int64_t t = len - 1; t >= 0; --t) {
#pragma GCC unroll 8
    for (int k = 0; k < R; ++k) {
      const int64_t i = (b + k) * len + t;
      const A m = mask[i] ? A(1) : A(0);
      const A v = values ? A(values[i]) : A(0);
      affine_apply(gae_step(m, A(rewards[i]), v, gamma, lam, mode), nv[k], a[k]);
      advantages[i] = a[k];
      if (returns) returns[i] = gae_return(a[k], m, v, mode);
    }
  }
}

// Reverse scan of every row; `values` may be null (discounted returns), `returns` too.
template <typename scalar_t, typename A>
void scan_forward(const scalar_t* rewards, const scalar_t* values, const bool* mask, A* advantages,
                  A* returns, Rows rows, A gamma, A lam, MaskMode mode) {
  constexpr int64_t kRows = 4;
  const int64_t grain = std::max<int64_t>(1, row_grain(rows.len) / kRows);
  at::parallel_for(0, (rows.n + kRows - 1) / kRows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      int64_t b = blk * kRows;
      const int64_t stop = std::min(rows.n, b + kRows);
      for (; b + 4 <= stop; b += 4) {
        scan_rows<4>(rewards, values, mask, advantages, returns, b, rows.len, gamma, lam, mode);
      }
      for (; b < stop; ++b) {
        scan_rows<1>(rewards, values, mask, advantages, returns, b, rows.len, gamma, lam, mode);
      }
    }
  });
}

// Forward-time adjoint scan. g_adv may be null (discounted returns); grad_values may be null.
template <typename scalar_t, typename A>
void scan_backward(const A* g_adv, const A* g_ret, const bool* mask, scalar_t* grad_rewards,
                   scalar_t* grad_values, Rows rows, A gamma, A lam, MaskMode mode) {
  at::parallel_for(0, rows.n, row_grain(rows.len), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      A la = 0, lnv = 0, m_prev = 0;
      for (int64_t t = 0; t < rows.len; ++t) {
        const int64_t i = b * rows.len + t;
        const A m = mask[i] ? A(1) : A(0);
        const A gr = g_ret[i];
        const A g = g_adv ? g_adv[i] + gr : gr;
        affine_apply(gae_adjoint_step(m_prev, g, gamma, lam, mode), la, lnv);
        A dr, dv;
        gae_grads(la, lnv, m, gr, mode, dr, dv);
        grad_rewards[i] = static_cast<scalar_t>(dr);
        if (grad_values) grad_values[i] = static_cast<scalar_t>(dv);
        m_prev = m;
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gae_cpu(const at::Tensor& rewards, const at::Tensor& values,
                                           const at::Tensor& mask, double gamma, double lam,
                                           const std::string& mode_name) {
  MaskMode mode;
  const Rows rows = check("gae", rewards, mask, &mode, mode_name, gamma, lam);
  TORCH_CHECK(values.sizes() == rewards.sizes(), "gae: values must have the shape of rewards");
  TORCH_CHECK(values.scalar_type() == rewards.scalar_type(), "gae: values and rewards dtypes differ");
  const auto r = rewards.contiguous(), v = values.contiguous(), m = bool_mask(mask);
  auto adv = at::empty(r.sizes(), r.options().dtype(acc_dtype(r)));
  auto ret = at::empty_like(adv);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "gae_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    scan_forward<scalar_t, A>(r.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), m.data_ptr<bool>(),
                              adv.data_ptr<A>(), ret.data_ptr<A>(), rows, A(gamma), A(lam), mode);
  });
  return {adv, ret};
}

std::tuple<at::Tensor, at::Tensor> gae_backward_cpu(const at::Tensor& grad_advantages,
                                                    const at::Tensor& grad_returns,
                                                    const at::Tensor& mask, double gamma,
                                                    double lam, const std::string& mode_name,
                                                    at::ScalarType dtype) {
  MaskMode mode;
  const Rows rows = check("gae_backward", grad_advantages, mask, &mode, mode_name, gamma, lam);
  TORCH_CHECK(grad_returns.sizes() == grad_advantages.sizes(), "gae_backward: shape mismatch");
  const auto acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const auto ga = grad_advantages.to(acc).contiguous(), gr = grad_returns.to(acc).contiguous();
  const auto m = bool_mask(mask);
  auto grad_r = at::empty(ga.sizes(), ga.options().dtype(dtype));
  auto grad_v = at::empty_like(grad_r);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "gae_backward_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    scan_backward<scalar_t, A>(ga.data_ptr<A>(), gr.data_ptr<A>(), m.data_ptr<bool>(),
                               grad_r.data_ptr<scalar_t>(), grad_v.data_ptr<scalar_t>(), rows,
                               A(gamma), A(lam), mode);
  });
  return {grad_r, grad_v};
}

at::Tensor discounted_returns_cpu(const at::Tensor& rewards, const at::Tensor& mask, double gamma,
                                  const std::string& mode_name) {
  MaskMode mode;
  const Rows rows = check("discounted_returns", rewards, mask, &mode, mode_name, gamma, 1.0);
  const auto r = rewards.contiguous(), m = bool_mask(mask);
  auto ret = at::empty(r.sizes(), r.options().dtype(acc_dtype(r)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "returns_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    scan_forward<scalar_t, A>(r.data_ptr<scalar_t>(), nullptr, m.data_ptr<bool>(),
                              ret.data_ptr<A>(), nullptr, rows, A(gamma), A(1), mode);
  });
  return ret;
}

at::Tensor discounted_returns_backward_cpu(const at::Tensor& grad_returns, const at::Tensor& mask,
                                           double gamma, const std::string& mode_name,
                                           at::ScalarType dtype) {
  MaskMode mode;
  const Rows rows = check("discounted_returns_backward", grad_returns, mask, &mode, mode_name,
                          gamma, 1.0);
  const auto acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const auto gr = grad_returns.to(acc).contiguous();
  const auto m = bool_mask(mask);
  auto grad_r = at::empty(gr.sizes(), gr.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "returns_backward_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    scan_backward<scalar_t, A>(nullptr, gr.data_ptr<A>(), m.data_ptr<bool>(),
                               grad_r.data_ptr<scalar_t>(), nullptr, rows, A(gamma), A(1), mode);
  });
  return grad_r;
}

TORCH_LIBRARY_IMPL(ppokernels, CPU, m) {
  m.impl("gae", &gae_cpu);
  m.impl("gae_backward", &gae_backward_cpu);
  m.impl("discounted_returns", &discounted_returns_cpu);
  m.impl("discounted_returns_backward", &discounted_returns_backward_cpu);
}

}  // namespace ppokernels
