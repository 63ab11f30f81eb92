// CPU kernel of rollout_correction: importance weights, rejection mask and per-row statistics of
// the trainer/sampler log-prob mismatch. One row per task: for the sequence levels and the
// sequence criteria a first sweep gathers what every token's weight and verdict depend on (the
// row's summed log-ratio, the criteria's row values); one sweep (from cache for the second)
// writes the weights and the rejection mask and gathers the rest, with one exp per token. Runs
// of padding (a vector of masked tokens) are skipped. SIMD over kVecF tokens for fp32 / bf16 / fp16 inputs
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

// The row's tokens at [t, t + width(V)): the mask as 1 / 0, the log-probs with masked lanes
// read as 0 (whatever they hold: NaN there must not reach a sum), the log-ratio and its clamp.
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

// Sweep A, only for the sequence levels and the sequence criteria (what the weights and the
// rejection mask of every token depend on): the row's count and summed log-ratio, the sums and
// maxima of the sequence criteria's statistics.
template <typename V>
struct SweepA {
  V n = V(0.f), sx = V(0.f);
  V cs[kRcMaxCriteria], cm[kRcMaxCriteria];
  SweepA() {
    for (int c = 0; c < kRcMaxCriteria; ++c) cs[c] = V(0.f), cm[c] = V(-kInf);
  }
};

template <typename V, typename scalar_t>
PPK_HOST_DEVICE void sweep_a(const RcParams& p, const scalar_t* a, const scalar_t* b,
                             const uint8_t* m, int64_t t, SweepA<V>& s) {
  const Tok<V, scalar_t> k(a, b, m, t, p.clamp);
  const auto valid = k.mv > V(0);
  s.n = s.n + k.mv;
  s.sx = s.sx + k.x;
  for (int c = 0; c < p.n_crit; ++c) {
    if (p.agg[c] == kRcAggToken) continue;
    const V st = rc_estimator(p.est[c], k.xc, k.lp, k.rlp);
    s.cs[c] = vadd_where(valid, s.cs[c], st);
    s.cm[c] = vselect(valid, vmax(s.cm[c], st), s.cm[c]);
  }
}

// Sweep B, every row: the weights and the rejection mask (written), and every sum and extreme of
// ROW_STATS. The accumulators are locals of run_row (registers); the token criteria's, indexed
// by the criterion, sit apart in TokCrit.
template <typename V>
struct SweepB {
  V n = V(0.f), sx = V(0.f), slp = V(0.f), srlp = V(0.f), sk3 = V(0.f), srho = V(0.f);
  V sabs = V(0.f), mabs = V(0.f), sw = V(0.f), sw2 = V(0.f), mw = V(-kInf), nw = V(kInf);
  V nh = V(0.f), nl = V(0.f), sr = V(0.f), nrej = V(0.f);
};
template <typename V>
struct TokCrit {
  V q[kRcMaxCriteria][kRcTokAcc];  // in the order of rc_token_criterion_stats
  TokCrit() {
    for (int i = 0; i < kRcMaxCriteria; ++i) {
      for (int k = 0; k < kRcTokAcc; ++k) q[i][k] = V(k == 1 ? -kInf : (k == 2 ? kInf : 0));
    }
  }
};

// Row constants of sweep B: the sequence levels' raw row weight, the sequence criteria's
// verdicts, exp(+-C) (the clamped exp of a token beyond the clamp, made by the same vexp).
template <typename V>
struct RowConst {
  V raw_row, e_hi, e_lo;
  bool any_seq_reject;
};

template <typename V, typename scalar_t, typename acc_t>
PPK_HOST_DEVICE void sweep_b(const RcParams& p, const RowConst<V>& r, const scalar_t* a,
                             const scalar_t* b, const uint8_t* m, int64_t t, acc_t* w_out,
                             float* keep_out, SweepB<V>& s, TokCrit<V>& tc) {
  const Tok<V, scalar_t> k(a, b, m, t, p.clamp);
  const auto valid = k.mv > V(0);
  // one exp per token: exp(xc) is exp(x) inside the clamp, exp(+-C) beyond it
  const V ex = vexp(k.x);
  const V etok = vselect(k.x > V(p.clamp), r.e_hi, vselect(k.x < V(-p.clamp), r.e_lo, ex));
  const V raw = vselect(valid, p.level == kRcToken ? etok : r.raw_row, V(0));
  const V w = vselect(valid, rc_bound(raw, p.mode, p.lower, p.upper), V(0));
  vstore(w_out + t, w);
  s.n = s.n + k.mv;
  s.sx = s.sx + k.x;
  s.slp = s.slp + k.lp;
  s.srlp = s.srlp + k.rlp;
  // exp(x) - 1 - x as expm1_minus_y (common.h) computes it, from the exp above; 0 where masked
  s.sk3 = s.sk3 + vselect(vabs(k.x) < V(kExpSeriesBound),
                          k.x * k.x * (V(0.5) * exp_series_tail(k.x)), ex - V(1) - k.x);
  s.srho = vadd_where(valid, s.srho, etok * etok);
  s.sabs = s.sabs + vabs(k.x);
  s.mabs = vmax(s.mabs, vabs(k.x));
  s.sw = s.sw + w;
  s.sw2 = s.sw2 + w * w;
  s.mw = vselect(valid, vmax(s.mw, w), s.mw);
  s.nw = vselect(valid, vmin(s.nw, w), s.nw);
  s.nh = vadd_where(valid & (raw > V(p.upper)), s.nh, V(1));
  s.nl = vadd_where(valid & (raw < V(p.report_low)), s.nl, V(1));
  s.sr = s.sr + raw;
  V kp = r.any_seq_reject ? V(0) : k.mv;
  for (int c = 0; c < p.n_crit; ++c) {
    if (p.agg[c] != kRcAggToken) continue;
    const V st = rc_estimator(p.est[c], k.xc, k.lp, k.rlp);
    const V in = k.mv * rc_inside(st, p.lo[c], p.hi[c]);
    const V sc = vclamp(st, V(p.clo[c]), V(p.hi[c]));
    V* q = tc.q[c];
    q[0] = vadd_where(valid, q[0], st);
    q[1] = vselect(valid, vmax(q[1], st), q[1]);
    q[2] = vselect(valid, vmin(q[2], st), q[2]);
    q[3] = vadd_where(valid & (st > V(p.hi[c])), q[3], V(1));
    q[4] = vadd_where(valid & (st < V(p.lo[c])), q[4], V(1));
    q[5] = vadd_where(valid, q[5], sc);
    q[6] = vadd_where(valid, q[6], sc * sc);
    q[7] = q[7] + (k.mv - in);
    kp = kp * in;
  }
  s.nrej = s.nrej + (k.mv - kp);
  vstore(keep_out + t, kp);
}

// True when the kVecF mask bytes at m + t are all 0 (padding: nothing to read; in sweep B
// the weights and the rejection mask there are 0).
inline bool chunk_empty(const uint8_t* m, int64_t t) {
  return mask_chunk_empty(reinterpret_cast<const bool*>(m + t));
}

template <typename scalar_t>
void run_row(const RcParams& p, const scalar_t* a, const scalar_t* b, const uint8_t* m, int64_t T,
             acc_type<scalar_t>* w_out, float* keep_out, acc_type<scalar_t>* stats) {
  using acc_t = acc_type<scalar_t>;
  constexpr bool simd = !std::is_same_v<scalar_t, double>;
  using V = std::conditional_t<simd, SimdF, acc_t>;
  const int64_t vec_end = simd ? T / kVecF * kVecF : 0;
  auto sum = [&](const V& v, acc_t s) { return static_cast<acc_t>(lane_sum(v) + s); };
  auto ext = [&](const V& v, acc_t s, bool is_max) {
    return static_cast<acc_t>(lane_max(v, s, is_max));
  };
  acc_t* cstats = stats + kRcRowStats;
  bool seq_crit = false;
  for (int c = 0; c < p.n_crit; ++c) seq_crit = seq_crit || p.agg[c] != kRcAggToken;
  // ---- sweep A (sequence levels, sequence criteria): the row value s_b and the verdicts
  RowConst<V> rv;
  RowConst<acc_t> rs;
  acc_t raw_row = 0;
  rv.any_seq_reject = rs.any_seq_reject = false;
  if (p.level != kRcToken || seq_crit) {
    SweepA<V> va;
    SweepA<acc_t> sa;
    for (int64_t t = 0; t < vec_end; t += kVecF) {
      if (!chunk_empty(m, t)) sweep_a(p, a, b, m, t, va);
    }
    for (int64_t t = vec_end; t < T; ++t) sweep_a(p, a, b, m, t, sa);
    const acc_t n = sum(va.n, sa.n);
    raw_row = rc_row_raw(rc_row_logratio(p.level, n, sum(va.sx, sa.sx)), p.clamp);
    for (int c = 0; c < p.n_crit; ++c) {
      if (p.agg[c] == kRcAggToken) continue;
      const acc_t v = rc_seq_value(p.agg[c], n, sum(va.cs[c], sa.cs[c]),
                                   ext(va.cm[c], sa.cm[c], true));
      const bool keep = rc_seq_criterion_stats(p, c, v, n, cstats + kRcCritStats * c) > 0;
      rv.any_seq_reject = rs.any_seq_reject = rv.any_seq_reject || !keep;
    }
  }
  // ---- sweep B: weights, rejection mask, the sums and extremes
  rv.raw_row = V(raw_row);
  rs.raw_row = raw_row;
  rv.e_hi = vexp(V(p.clamp));
  rv.e_lo = vexp(V(-p.clamp));
  rs.e_hi = vexp(acc_t(p.clamp));
  rs.e_lo = vexp(acc_t(-p.clamp));
  SweepB<V> vb;
  SweepB<acc_t> sb;
  TokCrit<V> vt;
  TokCrit<acc_t> st;
  for (int64_t t = 0; t < vec_end; t += kVecF) {
    if (chunk_empty(m, t)) {
      vstore(w_out + t, V(0));
      vstore(keep_out + t, V(0));
      continue;
    }
    sweep_b(p, rv, a, b, m, t, w_out, keep_out, vb, vt);
  }
  for (int64_t t = vec_end; t < T; ++t) sweep_b(p, rs, a, b, m, t, w_out, keep_out, sb, st);
  const acc_t n = sum(vb.n, sb.n), sx = sum(vb.sx, sb.sx);
  const acc_t s = rc_row_logratio(p.level, n, sx);
  stats[kRsCount] = n;
  stats[kRsSumLogratio] = sx;
  stats[kRsSumLogprobs] = sum(vb.slp, sb.slp);
  stats[kRsSumRolloutLogprobs] = sum(vb.srlp, sb.srlp);
  stats[kRsSumK3] = sum(vb.sk3, sb.sk3);
  stats[kRsSumRatioSq] = sum(vb.srho, sb.srho);
  stats[kRsSumAbsLogratio] = sum(vb.sabs, sb.sabs);
  stats[kRsMaxAbsLogratio] = ext(vb.mabs, sb.mabs, true);
  stats[kRsSeqLogratio] = s;
  stats[kRsSeqWeight] = rc_bound(rc_row_raw(s, p.clamp), p.mode, p.lower, p.upper);
  stats[kRsSumWeights] = sum(vb.sw, sb.sw);
  stats[kRsSumWeightsSq] = sum(vb.sw2, sb.sw2);
  stats[kRsMaxWeight] = ext(vb.mw, sb.mw, true);
  stats[kRsMinWeight] = ext(vb.nw, sb.nw, false);
  stats[kRsCountHigh] = sum(vb.nh, sb.nh);
  stats[kRsCountLow] = sum(vb.nl, sb.nl);
  stats[kRsSumRawWeights] = sum(vb.sr, sb.sr);
  stats[kRsCountRejected] = sum(vb.nrej, sb.nrej);
  for (int c = 0; c < p.n_crit; ++c) {
    if (p.agg[c] != kRcAggToken) continue;
    acc_t acc[kRcTokAcc];
    for (int k = 0; k < kRcTokAcc; ++k) {
      acc[k] = k == 1 || k == 2 ? ext(vt.q[c][k], st.q[c][k], k == 1) : sum(vt.q[c][k], st.q[c][k]);
    }
    rc_token_criterion_stats(n, acc, cstats + kRcCritStats * c);
  }
}

// The row's mask as 0 / 1 bytes, from a mask of U (a floating mask: any bit but the sign).
template <typename U>
void load_mask_row(const U* src, U nosign, int64_t T, uint8_t* out) {
  for (int64_t t = 0; t < T; ++t) out[t] = (src[t] & nosign) != 0;
}
// The rejection mask's row in U: `one` (the bits of 1) where kept.
template <typename U>
void store_keep_row(const float* keep, U one, int64_t T, U* out) {
  for (int64_t t = 0; t < T; ++t) out[t] = keep[t] != 0.f ? one : U(0);
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
  const ScalarType mt = k.mask.scalar_type();
  const int width = rc_mask_width(mt);
  // a bool mask is read and written in place (its bytes are 0 / 1); others through row buffers
  const bool direct = mt == kBool;
  const uint64_t one = rc_one_bits(mt);
  const uint64_t nosign = rc_mask_floating(mt) ? ~(uint64_t(1) << (8 * width - 1)) : ~uint64_t(0);
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
      std::vector<uint8_t> mbuf(direct ? 0 : T + kVecF, 0);
      std::vector<float> kb(T + kVecF, 0.f);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t off = row * T;
        const uint8_t* m = mask_bytes + off;
        if (!direct) {
          const uint8_t* src = mask_bytes + off * width;
          switch (width) {
            case 1: load_mask_row(src, uint8_t(nosign), T, mbuf.data()); break;
            case 2: load_mask_row(reinterpret_cast<const uint16_t*>(src), uint16_t(nosign), T, mbuf.data()); break;
            case 4: load_mask_row(reinterpret_cast<const uint32_t*>(src), uint32_t(nosign), T, mbuf.data()); break;
            default: load_mask_row(reinterpret_cast<const uint64_t*>(src), nosign, T, mbuf.data());
          }
          m = mbuf.data();
        }
        run_row<scalar_t>(k.p, a + off, b + off, m, T, w + off, kb.data(), st + row * cols);
        uint8_t* out = keep_bytes + off * width;
        switch (width) {
          case 1: store_keep_row(kb.data(), uint8_t(one), T, out); break;
          case 2: store_keep_row(kb.data(), uint16_t(one), T, reinterpret_cast<uint16_t*>(out)); break;
          case 4: store_keep_row(kb.data(), uint32_t(one), T, reinterpret_cast<uint32_t*>(out)); break;
          default: store_keep_row(kb.data(), one, T, reinterpret_cast<uint64_t*>(out));
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
