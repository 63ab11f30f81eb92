// CPU kernels of masked_mean, masked_var and masked_whiten (forward, backward).
// The group baselines are in group_advantages.cpp.
//
// Reductions are deterministic: the data is cut into fixed chunks of kChunk entries (independent
// of the thread count). Each chunk is read from memory once and summed by one thread in acc_t
// (SIMD lanes for float) in two sweeps while it is in cache: its count, sum and mean mu_c, then
// its sums centred at mu_c. The chunk statistics are merged in double, in chunk order (Chan et
// al.'s pairwise update), so the result is the two-pass one and the same bits on every call.
#include <array>
#include <vector>

#include "ppokernels/cpu_isa.h"
#include "ppokernels/masked_whiten_args.h"
#include "ppokernels/cpu_vec.h"

namespace ppokernels::CPU_CAPABILITY {
namespace {

constexpr int64_t kChunk = 8192;  // entries per reduction partial (fixed: determinism)

// Statistics of one chunk [b, e): count n_c, sum S_c, sum g G_c, then, centred at the chunk mean
// mu_c, sum m d^2, sum m d (the rounding residue of mu_c) and sum g d, d = x - mu_c. g may be
// null. Masked x is selected away, never multiplied (inf / NaN padding does not leak).
struct ChunkStats {
  double n, sum, sum_g, mu, m2, dsum, sum_gd;
};

template <typename scalar_t, bool kCentred>
void chunk_sweep(const scalar_t* x, const bool* m, const float* gf, const double* gd, int64_t b,
                 int64_t e, acc_type<scalar_t> mean, double* out) {
  using acc_t = acc_type<scalar_t>;
  acc_t s0 = 0, s1 = 0, s2 = 0;
  int64_t i = b;
  if constexpr (std::is_same_v<scalar_t, float>) {
    VecF v0(0.f), v1(0.f), v2(0.f);
    const VecF vmean(mean), zero(0.f);
    for (; i + kVecF <= e; i += kVecF) {
      const VecF mk = vload_mask(m + i);
      const VecF valid = mk != zero;
      const VecF xv = VecF::loadu(x + i);
      // feeds_stats_grad (masked_whiten.h): valid, or finite (x - x == 0) masked padding
      const VecF feed = valid | ((xv - xv) == zero);
      const VecF gv = gf ? vselect(feed, VecF::loadu(gf + i), zero) : zero;
      if constexpr (kCentred) {
        const VecF d = xv - vmean;
        v0 = v0 + vselect(valid, d * d, zero);
        v1 = v1 + vselect(valid, d, zero);
        v2 = v2 + vselect(feed, gv * d, zero);
      } else {
        v0 = v0 + mk;
        v1 = v1 + vselect(valid, VecF::loadu(x + i), zero);
        v2 = v2 + gv;
      }
    }
    s0 = hsum(v0);  // lanes in a fixed order
    s1 = hsum(v1);
    s2 = hsum(v2);
  }
  for (; i < e; ++i) {
    const bool feed = feeds_stats_grad(m[i], acc_t(x[i]));
    const acc_t gv = !feed ? acc_t(0) : gf ? acc_t(gf[i]) : gd ? acc_t(gd[i]) : acc_t(0);
    if constexpr (kCentred) {
      const acc_t d = acc_t(x[i]) - mean;
      if (m[i]) {
        s0 += d * d;
        s1 += d;
      }
      if (feed) s2 += gv * d;
    } else {
      if (m[i]) {
        s0 += 1;
        s1 += acc_t(x[i]);
      }
      s2 += gv;
    }
  }
  out[0] = double(s0);
  out[1] = double(s1);
  out[2] = double(s2);
}

template <typename scalar_t>
ChunkStats chunk_stats(const scalar_t* x, const bool* m, const float* gf, const double* gd,
                       int64_t b, int64_t e) {
  using acc_t = acc_type<scalar_t>;
  double a[3], c[3];
  chunk_sweep<scalar_t, false>(x, m, gf, gd, b, e, acc_t(0), a);
  const acc_t mu = a[0] > 0 ? acc_t(a[1] / a[0]) : acc_t(0);  // an empty chunk centres at 0
  chunk_sweep<scalar_t, true>(x, m, gf, gd, b, e, mu, c);
  return {a[0], a[1], a[2], double(mu), c[0], c[1], c[2]};
}

// Statistics of x over the mask (and of g when given): fills stats (kNumStats doubles).
template <typename scalar_t>
void masked_stats(const scalar_t* x, const bool* m, const Tensor& g, int64_t n, bool unbiased,
                  bool shift_mean, double eps, double* stats) {
  const float* gf = g.defined() && g.scalar_type() == kFloat ? g.const_data_ptr<float>() : nullptr;
  const double* gd =
      g.defined() && g.scalar_type() == kDouble ? g.const_data_ptr<double>() : nullptr;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<ChunkStats> part(chunks);
  parallel_for_work(chunks, kChunk, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      part[c] = chunk_stats(x, m, gf, gd, c * kChunk, std::min(n, (c + 1) * kChunk));
    }
  });
  double a[3] = {0.0, 0.0, 0.0};
  for (const auto& p : part) {  // fixed order
    a[0] += p.n;
    a[1] += p.sum;
    a[2] += p.sum_g;
  }
  masked_stats_finalize_a(a, stats);
  // Chan's merge: sum m (x - mu)^2 = sum_c [m2_c + 2 (mu_c - mu) dsum_c + n_c (mu_c - mu)^2],
  // sum g (x - mu) = sum_c [sum_gd_c + (mu_c - mu) sum_g_c].
  const double mu = stats[kStatMean];
  double b[2] = {0.0, 0.0};
  for (const auto& p : part) {
    const double shift = p.mu - mu;
    if (p.n > 0) b[0] += p.m2 + 2.0 * shift * p.dsum + p.n * shift * shift;
    b[1] += p.sum_gd + shift * p.sum_g;
  }
  masked_stats_finalize_b(b, stats, unbiased, shift_mean, eps);
}

// y[i] = f(x[i], m[i], g[i]) over all entries; SIMD when x is float.
template <typename scalar_t, typename out_t, typename F>
void map_masked(const scalar_t* x, const bool* m, const float* gf, const double* gd, out_t* y,
                int64_t n, F f) {
  using acc_t = acc_type<scalar_t>;
  parallel_for_work(n, 1, [&](int64_t b, int64_t e) {
    int64_t i = b;
    if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<out_t, float>) {
      for (; i + kVecF <= e; i += kVecF) {
        const VecF gv = gf ? VecF::loadu(gf + i) : VecF(0.f);
        f(VecF::loadu(x + i), vload_mask(m + i), gv).store(y + i);
      }
    }
    for (; i < e; ++i) {
      const acc_t gv = gf ? acc_t(gf[i]) : gd ? acc_t(gd[i]) : acc_t(0);
      y[i] = static_cast<out_t>(f(acc_t(x[i]), acc_t(m[i] ? 1 : 0), gv));
    }
  });
}

}  // namespace

// [mean, var, count] of the masked entries, in fp32 (fp64 for fp64 x).
Tensor masked_moments_cpu(const Tensor& x, const Tensor& mask, bool unbiased) {
  const MaskedArgs a = masked_args("masked_moments", x, mask, nullptr);
  double stats[kNumStats];
  PPK_DISPATCH_FLOATING(a.x.scalar_type(), "masked_moments", [&] {
    masked_stats(a.x.const_data_ptr<scalar_t>(), a.m.const_data_ptr<bool>(), Tensor(), a.x.numel(),
                 unbiased, true, 0.0, stats);
  });
  const double o[3] = {stats[kStatMean], stats[kStatVar], stats[kStatCount]};
  return tensor_from(o, {3}, acc_dtype(x), x);
}

Tensor masked_moments_backward_cpu(const Tensor& grad, const Tensor& x, const Tensor& mask,
                                   const Tensor& moments, bool unbiased) {
  const MaskedArgs a = moments_backward_args(grad, x, mask, moments);
  // the coefficients in double, from the entries as given
  const std::vector<double> g = doubles_of(grad), mo = doubles_of(moments);
  const double* gp = g.data();
  const double* mp = mo.data();
  const double mean = mp[0];
  const MomentsCoefs c = moments_coefs(gp[0], gp[1], mp[2], unbiased);
  const double c_mean = c.mean, c_var = c.var;
  PPK_DISPATCH_FLOATING(a.x.scalar_type(), "masked_moments_bwd", [&] {
    using acc_t = acc_type<scalar_t>;
    const acc_t mu = acc_t(mean), cm = acc_t(c_mean), cv = acc_t(c_var);
    map_masked(a.x.const_data_ptr<scalar_t>(), a.m.const_data_ptr<bool>(), nullptr, nullptr,
               a.out.mutable_data_ptr<scalar_t>(), a.x.numel(), [&](auto xv, auto mv, auto) {
                 using V = decltype(xv);
                 return moments_grad(xv, mv, V(mu), V(cm), V(cv));
               });
  });
  return a.out;
}

Tensor masked_whiten_cpu(const Tensor& x, const Tensor& mask, bool shift_mean, bool unbiased,
                         double eps) {
  const MaskedArgs a = whiten_args(x, mask);
  PPK_DISPATCH_FLOATING(a.x.scalar_type(), "masked_whiten", [&] {
    using acc_t = acc_type<scalar_t>;
    double stats[kNumStats];
    const scalar_t* xp = a.x.const_data_ptr<scalar_t>();
    masked_stats(xp, a.m.const_data_ptr<bool>(), Tensor(), a.x.numel(), unbiased, shift_mean, eps,
                 stats);
    const acc_t mu = acc_t(stats[kStatMean]), r = acc_t(stats[kStatRstd]);
    const acc_t back = shift_mean ? acc_t(0) : mu;
    map_masked(xp, a.m.const_data_ptr<bool>(), nullptr, nullptr, a.out.mutable_data_ptr<acc_t>(),
               a.x.numel(), [&](auto xv, auto, auto) {
                 using V = decltype(xv);
                 return whiten_value(xv, V(mu), V(r), V(back));
               });
  });
  return a.out;
}

Tensor masked_whiten_backward_cpu(const Tensor& grad, const Tensor& x, const Tensor& mask,
                                  bool shift_mean, bool unbiased, double eps) {
  const MaskedArgs a = whiten_backward_args(grad, x, mask);
  PPK_DISPATCH_FLOATING(a.x.scalar_type(), "masked_whiten_bwd", [&] {
    using acc_t = acc_type<scalar_t>;
    double stats[kNumStats];
    const scalar_t* xp = a.x.const_data_ptr<scalar_t>();
    masked_stats(xp, a.m.const_data_ptr<bool>(), a.g, a.x.numel(), unbiased, shift_mean, eps,
                 stats);
    const acc_t mu = acc_t(stats[kStatMean]), r = acc_t(stats[kStatRstd]);
    const acc_t cg = acc_t(stats[kStatCoefG]), ch = acc_t(stats[kStatCoefH]);
    const float* gf = a.g.scalar_type() == kFloat ? a.g.const_data_ptr<float>() : nullptr;
    const double* gd = a.g.scalar_type() == kDouble ? a.g.const_data_ptr<double>() : nullptr;
    map_masked(xp, a.m.const_data_ptr<bool>(), gf, gd, a.out.mutable_data_ptr<scalar_t>(),
               a.x.numel(), [&](auto xv, auto mv, auto gv) {
                 using V = decltype(xv);
                 return whiten_grad(gv, xv, mv, V(mu), V(r), V(cg), V(ch));
               });
  });
  return a.out;
}

// This level's kernels, registered by csrc/cpu_isa.cpp when the running CPU selects the level.
void register_masked_whiten(Library& m) {
  m.impl("masked_moments", TORCH_BOX(&masked_moments_cpu));
  m.impl("masked_moments_backward", TORCH_BOX(&masked_moments_backward_cpu));
  m.impl("masked_whiten", TORCH_BOX(&masked_whiten_cpu));
  m.impl("masked_whiten_backward", TORCH_BOX(&masked_whiten_backward_cpu));
}

}  // namespace ppokernels::CPU_CAPABILITY
