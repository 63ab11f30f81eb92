// CPU kernel of rollout_correction: importance weights, rejection mask and per-row statistics of
// the trainer/sampler log-prob mismatch. One row per task: a first sweep gathers the row sums
// the sequence-level weights and criteria need, a second (from cache) writes the weights and the
// rejection mask and gathers the rest. SIMD over kVecF tokens for fp32 / bf16 / fp16 inputs
// (fp64 runs the same code on doubles), per-lane accumulators summed in lane order: the same
// bits whatever the batch or the thread count. Setup in ppokernels/rollout_correction_args.h,
// the per-token math in ppokernels/rollout_correction.h.
#include <cstring>
#include <vector>

#include "ppokernels/cpu_isa.h"
#include "ppokernels/cpu_vec.h"
#include "ppokernels/rollout_correction_args.h"

namespace ppokernels::CPU_CAPABILITY {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// Reductions of a V (SIMD or scalar) to a double, lanes in order. Max / min propagate NaN.
template <typename V>
double lane_sum(const V& v) {
  if constexpr (std::is_arithmetic_v<V>) {
    return static_cast<double>(v);
  } else {
    alignas(64) float l[kVecF];
    vstore(l, v);
    double s = 0;
    for (int64_t k = 0; k < kVecF; ++k) s += l[k];
    return s;
  }
}
template <typename V>
double lane_max(const V& v, double init, bool is_max) {
  auto pick = [&](double a, double b) {
    if (a != a || b != b) return a != a ? a : b;
    return is_max ? (a > b ? a : b) : (a < b ? a : b);
  };
  if constexpr (std::is_arithmetic_v<V>) {
    return pick(init, static_cast<double>(v));
  } else {
    alignas(64) float l[kVecF];
    vstore(l, v);
    for (int64_t k = 0; k < kVecF; ++k) init = pick(init, l[k]);
    return init;
  }
}

// First sweep: counts and sums over the row's valid tokens, and the sums / maxima of the
// sequence-level criteria.
template <typename V>
struct Sweep1 {
  V n, sx, slp, srlp, sk3, srho, sabs, mabs;
  V cs[kRcMaxCriteria], cm[kRcMaxCriteria];
  Sweep1() : n(0.f), sx(0.f), slp(0.f), srlp(0.f), sk3(0.f), srho(0.f), sabs(0.f), mabs(0.f) {
    for (int c = 0; c < kRcMaxCriteria; ++c) cs[c] = V(0.f), cm[c] = V(-kInf);
  }
};

// Second sweep: the weights' sums and extremes, the bound counts, and per token criterion its
// statistic's sums, extremes, counts and rejections.
template <typename V>
struct Sweep2 {
  V sw, sw2, mw, nw, nh, nl, sr, nrej;
  V c[kRcMaxCriteria][kRcTokAcc];  // in the order of rc_token_criterion_stats
  Sweep2()
      : sw(0.f), sw2(0.f), mw(-kInf), nw(kInf), nh(0.f), nl(0.f), sr(0.f), nrej(0.f) {
    for (int i = 0; i < kRcMaxCriteria; ++i) {
      for (int k = 0; k < kRcTokAcc; ++k) c[i][k] = V(k == 1 ? -kInf : (k == 2 ? kInf : 0));
    }
  }
};

// The row's valid tokens at [t, t + width(V)): mask as 1 / 0, the log-probs with masked lanes
// read as 0 (whatever they hold: NaN there must not reach a sum).
template <typename V, typename scalar_t>
struct Tok {
  V mv, lp, rlp, x, xc;
  Tok(const scalar_t* a, const scalar_t* b, const uint8_t* m, int64_t t, double clamp) {
    mv = vload_mask<V>(reinterpret_cast<const bool*>(m + t));
    const auto valid = mv > V(0);
    lp = vselect(valid, vload<V>(a + t), V(0));
    rlp = vselect(valid, vload<V>(b + t), V(0));
    x = lp - rlp;
    xc = vclamp(x, V(-clamp), V(clamp));
  }
};

template <typename V, typename scalar_t>
void sweep1(const RcParams& p, const scalar_t* a, const scalar_t* b, const uint8_t* m, int64_t t,
            Sweep1<V>& s) {
  const Tok<V, scalar_t> k(a, b, m, t, p.clamp);
  const auto valid = k.mv > V(0);
  s.n = s.n + k.mv;
  s.sx = s.sx + k.x;
  s.slp = s.slp + k.lp;
  s.srlp = s.srlp + k.rlp;
  s.sk3 = s.sk3 + expm1_minus_y(k.x);  // 0 on masked lanes (x = 0 there)
  s.srho = vadd_where(valid, s.srho, vexp(k.xc + k.xc));
  s.sabs = s.sabs + vabs(k.x);
  s.mabs = vmax(s.mabs, vabs(k.x));
  for (int c = 0; c < p.n_crit; ++c) {
    if (p.agg[c] == kRcAggToken) continue;
    const V st = rc_estimator(p.est[c], k.xc, k.lp, k.rlp);
    s.cs[c] = vadd_where(valid, s.cs[c], st);
    s.cm[c] = vselect(valid, vmax(s.cm[c], st), s.cm[c]);
  }
}

// Row quantities between the sweeps (in the accumulation type, as the reference computes them).
template <typename acc_t>
struct RowScalars {
  acc_t n, s, raw, weight;
  acc_t keep[kRcMaxCriteria];
};

template <typename V, typename scalar_t, typename acc_t>
void sweep2(const RcParams& p, const RowScalars<acc_t>& r, const scalar_t* a, const scalar_t* b,
            const uint8_t* m, int64_t t, acc_t* w_out, float* keep_out, Sweep2<V>& s) {
  const Tok<V, scalar_t> k(a, b, m, t, p.clamp);
  const auto valid = k.mv > V(0);
  const V raw = vselect(valid, p.level == kRcToken ? vexp(k.xc) : V(r.raw), V(0));
  const V w = vselect(valid, rc_bound(raw, p.mode, p.lower, p.upper), V(0));
  vstore(w_out + t, w);
  s.sw = s.sw + w;
  s.sw2 = s.sw2 + w * w;
  s.mw = vselect(valid, vmax(s.mw, w), s.mw);
  s.nw = vselect(valid, vmin(s.nw, w), s.nw);
  s.nh = s.nh + k.mv * vselect(raw > V(p.upper), V(1), V(0));
  s.nl = s.nl + k.mv * vselect(raw < V(p.report_low), V(1), V(0));
  s.sr = s.sr + raw;
  V kp = k.mv;
  for (int c = 0; c < p.n_crit; ++c) {
    if (p.agg[c] != kRcAggToken) {
      kp = kp * V(r.keep[c]);
      continue;
    }
    const V st = rc_estimator(p.est[c], k.xc, k.lp, k.rlp);
    const V in = k.mv * rc_inside(st, p.lo[c], p.hi[c]);
    const V sc = vclamp(st, V(p.clo[c]), V(p.hi[c]));
    V* q = s.c[c];
    q[0] = vadd_where(valid, q[0], st);
    q[1] = vselect(valid, vmax(q[1], st), q[1]);
    q[2] = vselect(valid, vmin(q[2], st), q[2]);
    q[3] = q[3] + k.mv * vselect(st > V(p.hi[c]), V(1), V(0));
    q[4] = q[4] + k.mv * vselect(st < V(p.lo[c]), V(1), V(0));
    q[5] = vadd_where(valid, q[5], sc);
    q[6] = vadd_where(valid, q[6], sc * sc);
    q[7] = q[7] + (k.mv - in);
    kp = kp * in;
  }
  s.nrej = s.nrej + (k.mv - kp);
  vstore(keep_out + t, kp);
}

// The row's mask as 0 / 1 bytes, from any mask dtype (a float mask: any bit but the sign).
void load_mask_row(const uint8_t* src, int width, bool floating, int64_t T, uint8_t* out) {
  const uint64_t nosign = floating ? ~(uint64_t(1) << (8 * width - 1)) : ~uint64_t(0);
  for (int64_t t = 0; t < T; ++t) {
    uint64_t v = 0;
    std::memcpy(&v, src + t * width, width);
    out[t] = (v & nosign) != 0;
  }
}

template <typename scalar_t>
void run_row(const RcParams& p, const scalar_t* a, const scalar_t* b, const uint8_t* m, int64_t T,
             acc_type<scalar_t>* w_out, float* keep_out, acc_type<scalar_t>* stats) {
  using acc_t = acc_type<scalar_t>;
  constexpr bool simd = !std::is_same_v<scalar_t, double>;
  const int64_t vec_end = simd ? T / kVecF * kVecF : 0;
  // ---- sweep 1
  Sweep1<SimdF> v1;
  Sweep1<acc_t> s1;
  if constexpr (simd) {
    for (int64_t t = 0; t < vec_end; t += kVecF) sweep1(p, a, b, m, t, v1);
  }
  for (int64_t t = vec_end; t < T; ++t) sweep1(p, a, b, m, t, s1);
  auto sum1 = [&](const SimdF& v, acc_t s) { return static_cast<acc_t>(lane_sum(v) + s); };
  RowScalars<acc_t> r;
  r.n = sum1(v1.n, s1.n);
  const acc_t sx = sum1(v1.sx, s1.sx);
  r.s = rc_row_logratio(p.level, r.n, sx);
  r.raw = rc_row_raw(r.s, p.clamp);
  r.weight = rc_bound(r.raw, p.mode, p.lower, p.upper);
  acc_t* cstats = stats + kRcRowStats;
  for (int c = 0; c < p.n_crit; ++c) {
    if (p.agg[c] == kRcAggToken) continue;
    const acc_t sum = sum1(v1.cs[c], s1.cs[c]);
    const acc_t mx = static_cast<acc_t>(lane_max(v1.cm[c], s1.cm[c], true));
    const acc_t v = rc_seq_value(p.agg[c], r.n, sum, mx);
    r.keep[c] = rc_seq_criterion_stats(p, c, v, r.n, cstats + kRcCritStats * c);
  }
  // ---- sweep 2
  Sweep2<SimdF> v2;
  Sweep2<acc_t> s2;
  if constexpr (simd) {
    for (int64_t t = 0; t < vec_end; t += kVecF) sweep2(p, r, a, b, m, t, w_out, keep_out, v2);
  }
  for (int64_t t = vec_end; t < T; ++t) sweep2(p, r, a, b, m, t, w_out, keep_out, s2);
  auto max2 = [&](const SimdF& v, acc_t s, bool is_max) {
    return static_cast<acc_t>(lane_max(v, s, is_max));
  };
  stats[kRsCount] = r.n;
  stats[kRsSumLogratio] = sx;
  stats[kRsSumLogprobs] = sum1(v1.slp, s1.slp);
  stats[kRsSumRolloutLogprobs] = sum1(v1.srlp, s1.srlp);
  stats[kRsSumK3] = sum1(v1.sk3, s1.sk3);
  stats[kRsSumRatioSq] = sum1(v1.srho, s1.srho);
  stats[kRsSumAbsLogratio] = sum1(v1.sabs, s1.sabs);
  stats[kRsMaxAbsLogratio] = max2(v1.mabs, s1.mabs, true);
  stats[kRsSeqLogratio] = r.s;
  stats[kRsSeqWeight] = r.weight;
  stats[kRsSumWeights] = sum1(v2.sw, s2.sw);
  stats[kRsSumWeightsSq] = sum1(v2.sw2, s2.sw2);
  stats[kRsMaxWeight] = max2(v2.mw, s2.mw, true);
  stats[kRsMinWeight] = max2(v2.nw, s2.nw, false);
  stats[kRsCountHigh] = sum1(v2.nh, s2.nh);
  stats[kRsCountLow] = sum1(v2.nl, s2.nl);
  stats[kRsSumRawWeights] = sum1(v2.sr, s2.sr);
  stats[kRsCountRejected] = sum1(v2.nrej, s2.nrej);
  for (int c = 0; c < p.n_crit; ++c) {
    if (p.agg[c] != kRcAggToken) continue;
    acc_t acc[kRcTokAcc];
    for (int k = 0; k < kRcTokAcc; ++k) {
      acc[k] = k == 1 || k == 2 ? max2(v2.c[c][k], s2.c[c][k], k == 1)
                                : sum1(v2.c[c][k], s2.c[c][k]);
    }
    rc_token_criterion_stats(r.n, acc, cstats + kRcCritStats * c);
  }
}

// Two sweeps, a handful of exps and a few dozen operations per token.
constexpr int64_t kTokenCost = 8;

}  // namespace

std::tuple<Tensor, Tensor, Tensor> rollout_correction_cpu(
    const Tensor& logprobs, const Tensor& rollout_logprobs, const Tensor& mask,
    const std::string& level, const std::string& mode, std::vector<double> bounds,
    std::optional<double> logratio_clamp, std::vector<int64_t> criteria,
    std::vector<double> criteria_bounds) {
  RcArgs k = rollout_correction_args(logprobs, rollout_logprobs, mask, level, mode, bounds,
                                     logratio_clamp, criteria, criteria_bounds);
  const int width = rc_mask_width(k.mask.scalar_type());
  const bool floating = rc_mask_floating(k.mask.scalar_type());
  const uint64_t one = rc_one_bits(k.mask.scalar_type());
  const int64_t T = k.T, cols = k.p.n_cols();
  const uint8_t* mask_bytes = static_cast<const uint8_t*>(k.mask.const_data_ptr());
  uint8_t* keep_bytes = static_cast<uint8_t*>(k.keep.mutable_data_ptr());
  PPK_DISPATCH_FLOATING(k.lp.scalar_type(), "rollout_correction_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* a = k.lp.const_data_ptr<scalar_t>();
    const scalar_t* b = k.rlp.const_data_ptr<scalar_t>();
    acc_t* w = k.weights.mutable_data_ptr<acc_t>();
    acc_t* st = k.row_stats.mutable_data_ptr<acc_t>();
    parallel_for_work(k.B, std::max<int64_t>(T, 1) * kTokenCost, [&](int64_t begin, int64_t end) {
      // row buffers, padded to whole vectors (never a [B, T] tensor)
      std::vector<uint8_t> m(T + kVecF, 0);
      std::vector<float> kb(T + kVecF, 0.f);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t off = row * T;
        load_mask_row(mask_bytes + off * width, width, floating, T, m.data());
        run_row<scalar_t>(k.p, a + off, b + off, m.data(), T, w + off, kb.data(),
                          st + row * cols);
        uint8_t* out = keep_bytes + off * width;
        for (int64_t t = 0; t < T; ++t) {
          const uint64_t bits = kb[t] != 0.f ? one : 0;
          std::memcpy(out + t * width, &bits, width);
        }
      }
    });
  });
  return {k.weights, k.keep, k.row_stats};
}

// This level's kernel, registered by csrc/cpu_isa.cpp when the running CPU selects the level.
void register_rollout_correction(Library& m) {
  m.impl("rollout_correction", TORCH_BOX(&rollout_correction_cpu));
}

}  // namespace ppokernels::CPU_CAPABILITY
