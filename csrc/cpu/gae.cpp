// CPU kernels of the gae family: GAE and discounted returns (reverse scans over each row, kVecF
// rows per SIMD step, groups of rows in parallel), and their backward passes (the transposed
// scans, forward in time). Setup in ppokernels/gae_args.h, the math of one step in
// ppokernels/gae.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ppokernels/cpu_isa.h"
#include "ppokernels/cpu_tile.h"
#include "ppokernels/cpu_vec.h"
#include "ppokernels/gae_args.h"

namespace ppokernels::CPU_CAPABILITY {
namespace {

// A scan step costs more than one streamed element: the scalar scan is a chain of dependent
// multiply-adds (about 4 cycles of latency each), the SIMD one moves its tiles through transposes
// (about 0.8 ns per token on one Zen 5 core against 0.1-0.2 for an elementwise kernel). Counted
// as kScanCost element-operations when choosing the thread count, so a 64 x 2048 scan is split
// across threads.
constexpr int64_t kScanCost = 4;

// ---------------------------------------------------------------- fp32 / fp16 / bf16: SIMD
// kVecF rows [b, b + rows) advance together, one per lane, kVecF steps per tile (cpu_tile.h):
// the arithmetic of each row is that of the scalar scan below, step for step, so a row's result
// does not depend on its neighbours or the thread count. Lanes past `rows` run on zeros.

// How many tiles ahead the scans ask for their input lines (cpu_tile.h prefetch_tile).
constexpr int64_t kPrefetchTiles = 4;

// Reverse scan (forward pass). `values` null: discounted returns; `returns` may be null. Tile
// i ends kVecF i steps before the end of row 0 (rows further down lag by `skew`); a lane before
// its row's end runs on zeros with m = 0, which leave its zero state unchanged, and one past its
// row's start is never stored.
template <MaskMode kMode, typename scalar_t>
void scan_group(const scalar_t* rewards, const scalar_t* values, const bool* mask,
                float* advantages, float* returns, int64_t rows, int64_t len, float gamma,
                float lam) {
  SimdF nv(0.f), a(0.f);
  const SimdF g(gamma), l(lam);
  const int64_t skew = tile_skew(len);
  const int64_t tiles = (len + kVecF - 1) / kVecF + (skew ? rows - 1 : 0);
  for (int64_t i = 0; i < tiles; ++i) {
    const int64_t t0 = len - kVecF * (i + 1);
    const int64_t ahead = t0 - kPrefetchTiles * kVecF;
    prefetch_tile(rewards, len, rows, ahead, skew, len);
    prefetch_tile(values, len, rows, ahead, skew, len);
    prefetch_tile(mask, len, rows, ahead, skew, len);
    SimdF r[kVecF], v[kVecF], m[kVecF];
    load_tile(rewards, len, rows, t0, skew, len, r);
    if (values) load_tile(values, len, rows, t0, skew, len, v);
    load_tile(mask, len, rows, t0, skew, len, m);
    for (int64_t c = kVecF - 1; c >= 0; --c) {
      const SimdF mc = m[c], vc = values ? v[c] : SimdF(0.f);
      affine_apply(gae_step(mc, r[c], vc, g, l, kMode), nv, a);
      r[c] = a;  // the tiles are reused for the outputs
      if (returns) v[c] = gae_return(a, mc, vc, kMode);
    }
    store_tile(r, advantages, len, rows, t0, skew, len);
    if (returns) store_tile(v, returns, len, rows, t0, skew, len);
  }
}

// Forward-time adjoint scan (backward pass). g_adv null: discounted returns; grad_values may be
// null. Tile i starts kVecF i steps into row 0; a lane before its row's start runs on zeros with
// m = 0, which leave its zero state (and m_prev = 0) unchanged.
template <MaskMode kMode, typename scalar_t>
void adjoint_group(const float* g_adv, const float* g_ret, const bool* mask,
                   scalar_t* grad_rewards, scalar_t* grad_values, int64_t rows, int64_t len,
                   float gamma, float lam) {
  SimdF la(0.f), lnv(0.f), m_prev(0.f);
  const SimdF g(gamma), l(lam);
  const int64_t skew = tile_skew(len);
  const int64_t tiles = (len + kVecF - 1) / kVecF + (skew ? rows - 1 : 0);
  for (int64_t i = 0; i < tiles; ++i) {
    const int64_t t0 = kVecF * i;
    const int64_t ahead = t0 + kPrefetchTiles * kVecF;
    prefetch_tile(g_ret, len, rows, ahead, -skew, len);
    prefetch_tile(g_adv, len, rows, ahead, -skew, len);
    prefetch_tile(mask, len, rows, ahead, -skew, len);
    SimdF ga[kVecF], gr[kVecF], m[kVecF];
    load_tile(g_ret, len, rows, t0, -skew, len, gr);
    if (g_adv) load_tile(g_adv, len, rows, t0, -skew, len, ga);
    load_tile(mask, len, rows, t0, -skew, len, m);
    for (int64_t c = 0; c < kVecF; ++c) {
      const SimdF mc = m[c], grc = gr[c];
      const SimdF gc = g_adv ? ga[c] + grc : grc;
      affine_apply(gae_adjoint_step(m_prev, gc, g, l, kMode), la, lnv);
      SimdF dr, dv;
      gae_grads(la, lnv, mc, grc, kMode, dr, dv);
      ga[c] = dr;
      gr[c] = dv;
      m_prev = mc;
    }
    store_tile(ga, grad_rewards, len, rows, t0, -skew, len);
    if (grad_values) store_tile(gr, grad_values, len, rows, t0, -skew, len);
  }
}

// f(b, rows) on the groups of kVecF rows, in parallel; the mode as a compile-time constant.
template <typename F>
void for_each_group(GaeRows rows, const F& f) {
  const int64_t groups = (rows.n + kVecF - 1) / kVecF;
  parallel_for_work(groups, kScanCost * kVecF * rows.len, [&](int64_t begin, int64_t end) {
    for (int64_t grp = begin; grp < end; ++grp) {
      const int64_t b = grp * kVecF, n = std::min(kVecF, rows.n - b);
      if (rows.mode == MaskMode::kSkip) {
        f(std::integral_constant<MaskMode, MaskMode::kSkip>(), b, n);
      } else {
        f(std::integral_constant<MaskMode, MaskMode::kZero>(), b, n);
      }
    }
  });
}

// The SIMD groups need one full group: with fewer rows the lanes would mostly idle on one thread,
// while the scalar scan below splits the rows across threads (8 x 32768 forward + backward on the
// Zen 5, `ppokernels bench --preset cpu --ops gae`: 1.1 ms scalar on 2 threads, 2.3 ms in one
// half-empty group).
inline bool use_simd_groups(GaeRows rows) { return rows.n >= kVecF; }

// ---------------------------------------------------------------- fp64 and few rows: scalar
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
                  A* returns, GaeRows rows, A gamma, A lam, MaskMode mode) {
  if constexpr (std::is_same_v<A, float>) {
    if (use_simd_groups(rows)) {
      for_each_group(rows, [&](auto kMode, int64_t b, int64_t n) {
        const int64_t o = b * rows.len;
        scan_group<kMode.value>(rewards + o, values ? values + o : nullptr, mask + o,
                                advantages + o, returns ? returns + o : nullptr, n, rows.len,
                                gamma, lam);
      });
      return;
    }
  }
  constexpr int64_t kRows = 4;
  const int64_t blocks = (rows.n + kRows - 1) / kRows;
  parallel_for_work(blocks, kScanCost * kRows * rows.len, [&](int64_t begin, int64_t end) {
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
                   scalar_t* grad_values, GaeRows rows, A gamma, A lam, MaskMode mode) {
  if constexpr (std::is_same_v<A, float>) {
    if (use_simd_groups(rows)) {
      for_each_group(rows, [&](auto kMode, int64_t b, int64_t n) {
        const int64_t o = b * rows.len;
        adjoint_group<kMode.value>(g_adv ? g_adv + o : nullptr, g_ret + o, mask + o,
                                   grad_rewards + o, grad_values ? grad_values + o : nullptr, n,
                                   rows.len, gamma, lam);
      });
      return;
    }
  }
  parallel_for_work(rows.n, kScanCost * rows.len, [&](int64_t begin, int64_t end) {
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
  const auto a = gae_forward_args("gae", rewards, &values, mask, gamma, lam, mode_name);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.r.scalar_type(), "gae_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    scan_forward<scalar_t, A>(a.r.data_ptr<scalar_t>(), a.v.data_ptr<scalar_t>(),
                              a.m.data_ptr<bool>(), a.adv.data_ptr<A>(), a.ret.data_ptr<A>(),
                              a.rows, A(gamma), A(lam), a.rows.mode);
  });
  return {a.adv, a.ret};
}

std::tuple<at::Tensor, at::Tensor> gae_backward_cpu(const at::Tensor& grad_advantages,
                                                    const at::Tensor& grad_returns,
                                                    const at::Tensor& mask, double gamma,
                                                    double lam, const std::string& mode_name,
                                                    at::ScalarType dtype) {
  const auto a = gae_backward_args("gae_backward", &grad_advantages, grad_returns, mask, gamma,
                                   lam, mode_name, dtype);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "gae_backward_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    scan_backward<scalar_t, A>(a.ga.data_ptr<A>(), a.gr.data_ptr<A>(), a.m.data_ptr<bool>(),
                               a.grad_r.data_ptr<scalar_t>(), a.grad_v.data_ptr<scalar_t>(),
                               a.rows, A(gamma), A(lam), a.rows.mode);
  });
  return {a.grad_r, a.grad_v};
}

at::Tensor discounted_returns_cpu(const at::Tensor& rewards, const at::Tensor& mask, double gamma,
                                  const std::string& mode_name) {
  const auto a = gae_forward_args("discounted_returns", rewards, nullptr, mask, gamma, 1.0,
                                  mode_name);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.r.scalar_type(), "returns_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    scan_forward<scalar_t, A>(a.r.data_ptr<scalar_t>(), nullptr, a.m.data_ptr<bool>(),
                              a.adv.data_ptr<A>(), nullptr, a.rows, A(gamma), A(1), a.rows.mode);
  });
  return a.adv;
}

at::Tensor discounted_returns_backward_cpu(const at::Tensor& grad_returns, const at::Tensor& mask,
                                           double gamma, const std::string& mode_name,
                                           at::ScalarType dtype) {
  const auto a = gae_backward_args("discounted_returns_backward", nullptr, grad_returns, mask,
                                   gamma, 1.0, mode_name, dtype);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "returns_backward_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    scan_backward<scalar_t, A>(nullptr, a.gr.data_ptr<A>(), a.m.data_ptr<bool>(),
                               a.grad_r.data_ptr<scalar_t>(), nullptr, a.rows, A(gamma), A(1),
                               a.rows.mode);
  });
  return a.grad_r;
}

// This level's kernels, registered by csrc/cpu_isa.cpp when the running CPU selects the level.
void register_gae(torch::Library& m) {
  m.impl("gae", &gae_cpu);
  m.impl("gae_backward", &gae_backward_cpu);
  m.impl("discounted_returns", &discounted_returns_cpu);
  m.impl("discounted_returns_backward", &discounted_returns_backward_cpu);
}

}  // namespace ppokernels::CPU_CAPABILITY
