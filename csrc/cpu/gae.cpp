// CPU kernels of the gae family: GAE and discounted returns (reverse scans over each row, kVecF
// rows or chunks of rows per SIMD step in ppokernels/gae_cpu_simd.h, groups of them in parallel),
// and their backward passes (the transposed scans, forward in time). Setup in
// ppokernels/gae_args.h, the math of one step in ppokernels/gae.h.
#include <vector>

#include "ppokernels/cpu_isa.h"
#include "ppokernels/cpu_vec.h"
#include "ppokernels/gae_args.h"
#include "ppokernels/gae_cpu_simd.h"

namespace ppokernels::CPU_CAPABILITY {
namespace {

using namespace gae_simd;

// A scan step costs more than one streamed element: the scalar scan is a chain of dependent
// multiply-adds (about 4 cycles of latency each), the SIMD one moves its tiles through transposes
// (several times an elementwise kernel's time per token). Counted as kScanCost
// element-operations when choosing the thread count, so a 64 x 2048 scan is split across threads.
constexpr int64_t kScanCost = 4;

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

// How the SIMD groups take the rows: 1, a row per lane, with at least one full group of rows;
// with fewer, the lanes would mostly idle on one thread, so long rows are split into `cpr` > 1
// chunks of len / cpr steps, i.e. the [n, len] rows run as [n cpr, len / cpr] chunk rows
// (LaneChunks): the fewest chunks (a power of 2) that fill two groups, each a multiple of kVecF
// and at least 1024 steps. 0: neither (the scalar scan, rows split across threads). Fixed by the
// shape, so the results do not depend on the thread count; chunks re-associate the sums, so they
// differ from an unchunked scan by rounding.
inline int64_t simd_chunks(GaeRows rows) {
  if (rows.n >= kVecF) return 1;
  for (int64_t cpr = 2; cpr <= 2 * kVecF; cpr *= 2) {
    const int64_t s = rows.len / cpr;
    if (rows.len % cpr != 0 || s % kVecF != 0 || s < 1024) return 0;
    if (rows.n * cpr >= 2 * kVecF) return cpr;
  }
  return 0;
}

// Per-chunk buffers, padded to whole groups (a lane reads kVecF values from its group's start);
// none without chunks (cpr = 1).
struct ChunkBuffers {
  GaeRows chunks;
  std::vector<Affine<float>> maps;
  std::vector<float> init[3];
  ChunkBuffers(GaeRows rows, int64_t cpr) : chunks{rows.n * cpr, rows.len / cpr, rows.mode} {
    if (cpr == 1) return;
    const size_t padded = (chunks.n + kVecF - 1) / kVecF * kVecF;
    maps.resize(padded);
    for (auto& v : init) v.assign(padded, 0.f);
  }
  LaneChunks lanes(int64_t b) {
    LaneChunks c;
    for (int k = 0; k < 3; ++k) c.init[k] = init[k].data() + b;
    c.maps = maps.data() + b;
    return c;
  }
};

// The reverse scans in the SIMD groups (cpr: simd_chunks); with chunks, a compose pass first,
// then the chunks' starting states from their maps, then the scan.
template <typename scalar_t>
void simd_forward(const scalar_t* rewards, const scalar_t* values, const bool* mask,
                  float* advantages, float* returns, GaeRows rows, int64_t cpr, float gamma,
                  float lam) {
  ChunkBuffers buf(rows, cpr);
  const int64_t len = buf.chunks.len;
  const auto pass = [&](auto kCompose) {
    for_each_group(buf.chunks, [&](auto kMode, int64_t b, int64_t n) {
      const LaneChunks lanes = cpr > 1 ? buf.lanes(b) : LaneChunks{};
      const int64_t o = b * len;
      scan_group<kMode.value, kCompose.value>(
          rewards + o, values ? values + o : nullptr, mask + o,
          kCompose.value ? nullptr : advantages + o,
          kCompose.value || !returns ? nullptr : returns + o, n, len, gamma, lam,
          cpr > 1 ? &lanes : nullptr);
    });
  };
  if (cpr == 1) return pass(std::false_type());
  pass(std::true_type());
  for (int64_t r = 0; r < rows.n; ++r) {  // each chunk starts where the chunks after it leave
    float x0 = 0.f, x1 = 0.f;
    for (int64_t q = (r + 1) * cpr - 1; q >= r * cpr; --q) {
      buf.init[0][q] = x0, buf.init[1][q] = x1;
      affine_apply(buf.maps[q], x0, x1);
    }
  }
  pass(std::false_type());
}

// The same for the adjoint scans, forward in time.
template <typename scalar_t>
void simd_backward(const float* g_adv, const float* g_ret, const bool* mask,
                   scalar_t* grad_rewards, scalar_t* grad_values, GaeRows rows, int64_t cpr,
                   float gamma, float lam) {
  ChunkBuffers buf(rows, cpr);
  const int64_t len = buf.chunks.len;
  const auto pass = [&](auto kCompose) {
    for_each_group(buf.chunks, [&](auto kMode, int64_t b, int64_t n) {
      const LaneChunks lanes = cpr > 1 ? buf.lanes(b) : LaneChunks{};
      const int64_t o = b * len;
      adjoint_group<kMode.value, kCompose.value>(
          g_adv ? g_adv + o : nullptr, g_ret + o, mask + o,
          kCompose.value ? nullptr : grad_rewards + o,
          kCompose.value || !grad_values ? nullptr : grad_values + o, n, len, gamma, lam,
          cpr > 1 ? &lanes : nullptr);
    });
  };
  if (cpr == 1) return pass(std::false_type());
  for (int64_t q = 0; q < buf.chunks.n; ++q) {  // the mask before each chunk (0 before a row)
    buf.init[2][q] = q % cpr == 0 ? 0.f : float(mask[q * len - 1]);
  }
  pass(std::true_type());
  for (int64_t r = 0; r < rows.n; ++r) {  // each chunk starts where the chunks before it leave
    float x0 = 0.f, x1 = 0.f;
    for (int64_t q = r * cpr; q < (r + 1) * cpr; ++q) {
      buf.init[0][q] = x0, buf.init[1][q] = x1;
      affine_apply(buf.maps[q], x0, x1);
    }
  }
  pass(std::false_type());
}

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
    if (const int64_t cpr = simd_chunks(rows)) {
      simd_forward(rewards, values, mask, advantages, returns, rows, cpr, gamma, lam);
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
    if (const int64_t cpr = simd_chunks(rows)) {
      simd_backward(g_adv, g_ret, mask, grad_rewards, grad_values, rows, cpr, gamma, lam);
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

std::tuple<Tensor, Tensor> gae_cpu(const Tensor& rewards, const Tensor& values,
                                   const Tensor& mask, double gamma, double lam,
                                   const std::string& mode_name) {
  const auto a = gae_forward_args("gae", rewards, &values, mask, gamma, lam, mode_name);
  PPK_DISPATCH_FLOATING(a.r.scalar_type(), "gae_cpu", [&] {
    using A = acc_type<scalar_t>;
    scan_forward<scalar_t, A>(a.r.const_data_ptr<scalar_t>(), a.v.const_data_ptr<scalar_t>(),
                              a.m.const_data_ptr<bool>(), a.adv.mutable_data_ptr<A>(),
                              a.ret.mutable_data_ptr<A>(), a.rows, A(gamma), A(lam), a.rows.mode);
  });
  return {a.adv, a.ret};
}

std::tuple<Tensor, Tensor> gae_backward_cpu(const Tensor& grad_advantages,
                                            const Tensor& grad_returns, const Tensor& mask,
                                            double gamma, double lam,
                                            const std::string& mode_name, ScalarType dtype) {
  const auto a = gae_backward_args("gae_backward", &grad_advantages, grad_returns, mask, gamma,
                                   lam, mode_name, dtype);
  PPK_DISPATCH_FLOATING(dtype, "gae_backward_cpu", [&] {
    using A = acc_type<scalar_t>;
    scan_backward<scalar_t, A>(a.ga.const_data_ptr<A>(), a.gr.const_data_ptr<A>(),
                               a.m.const_data_ptr<bool>(), a.grad_r.mutable_data_ptr<scalar_t>(),
                               a.grad_v.mutable_data_ptr<scalar_t>(), a.rows, A(gamma), A(lam),
                               a.rows.mode);
  });
  return {a.grad_r, a.grad_v};
}

Tensor discounted_returns_cpu(const Tensor& rewards, const Tensor& mask, double gamma,
                              const std::string& mode_name) {
  const auto a = gae_forward_args("discounted_returns", rewards, nullptr, mask, gamma, 1.0,
                                  mode_name);
  PPK_DISPATCH_FLOATING(a.r.scalar_type(), "returns_cpu", [&] {
    using A = acc_type<scalar_t>;
    scan_forward<scalar_t, A>(a.r.const_data_ptr<scalar_t>(), nullptr, a.m.const_data_ptr<bool>(),
                              a.adv.mutable_data_ptr<A>(), nullptr, a.rows, A(gamma), A(1),
                              a.rows.mode);
  });
  return a.adv;
}

Tensor discounted_returns_backward_cpu(const Tensor& grad_returns, const Tensor& mask,
                                       double gamma, const std::string& mode_name,
                                       ScalarType dtype) {
  const auto a = gae_backward_args("discounted_returns_backward", nullptr, grad_returns, mask,
                                   gamma, 1.0, mode_name, dtype);
  PPK_DISPATCH_FLOATING(dtype, "returns_backward_cpu", [&] {
    using A = acc_type<scalar_t>;
    scan_backward<scalar_t, A>(nullptr, a.gr.const_data_ptr<A>(), a.m.const_data_ptr<bool>(),
                               a.grad_r.mutable_data_ptr<scalar_t>(), nullptr, a.rows, A(gamma),
                               A(1), a.rows.mode);
  });
  return a.grad_r;
}

// This level's kernels, registered by csrc/cpu_isa.cpp when the running CPU selects the level.
void register_gae(Library& m) {
  m.impl("gae", TORCH_BOX(&gae_cpu));
  m.impl("gae_backward", TORCH_BOX(&gae_backward_cpu));
  m.impl("discounted_returns", TORCH_BOX(&discounted_returns_cpu));
  m.impl("discounted_returns_backward", TORCH_BOX(&discounted_returns_backward_cpu));
}

}  // namespace ppokernels::CPU_CAPABILITY
