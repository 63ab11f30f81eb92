// CPU kernels of the logprobs family: per-token log-probs (and entropy) from logits, and the
// gradient with respect to the logits. One pass over each row in both directions (the forward on
// AVX-512 in two: the max, then the sums, the row still in L2; see row_stats_two_pass); rows are
// spread over threads with torch::stable::parallel_for, columns over SIMD lanes (fp32 math for
// fp32, bf16 and fp16 logits; fp64 for fp64). Each row is computed the same way wherever it sits
// in the batch, so its results are bitwise independent of the batch size.
#include <atomic>
#include <cfloat>
#include <cstring>
#include <limits>

#include "ppokernels/cpu_isa.h"
#include "ppokernels/cpu_vec.h"
#include "ppokernels/token_logprobs_args.h"

namespace ppokernels::CPU_CAPABILITY {
namespace {

constexpr int kBlock = 8;  // SIMD vectors per block of the online statistics (one rescale each)

// Rows per task: enough columns per task to amortise the scheduling.
int64_t row_grain(int64_t V) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1)); }

// ---------------------------------------------------------------- exp of a softmax shift
// exp(x) for x <= 0, -inf and NaN (x = z - max z: the online statistics of token_logprobs.h), as the
// exp_fn of softmax_stats_add_block. With AVX-512:
//   exp(x) = 2^t,  t = x log2(e) = n + f,  n = round(t),  |f| <= 1/2,
//   2^f = sum_k (f ln 2)^k / k!  for k <= 7 (truncation below 5.2e-9, inside fp32 rounding),
// scaled by 2^n with vscalefps, which rounds underflow to 0 (no range checks). x is clamped to
// >= -160 first, so -inf gives exactly 0 (2^-231) and NaN stays NaN (max returns its second
// operand when either is NaN). Fewer instructions than VecF::exp (cpu_vecf.h), which handles any
// x. Other levels and scalar types: vexp.
struct ExpNonPositive {
  template <typename T>
  T operator()(T x) const {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<T, VecF>) {
      static constexpr float kC[8] = {  // ln2^k / k!
          1.000000000e+00f, 6.931471806e-01f, 2.402265070e-01f, 5.550410866e-02f,
          9.618129108e-03f, 1.333355815e-03f, 1.540353039e-04f, 1.525273380e-05f};
      const __m512 xc = _mm512_max_ps(_mm512_set1_ps(-160.f), __m512(x));
      const __m512 t = _mm512_mul_ps(xc, _mm512_set1_ps(1.442695041f));
      const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m512 f = _mm512_sub_ps(t, n);
      __m512 p = _mm512_set1_ps(kC[7]);
      for (int k = 6; k >= 0; --k) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kC[k]));
      return VecF(_mm512_scalef_ps(p, n));
    }
#endif
    return vexp(x);
  }
};

// ---------------------------------------------------------------- loads and stores
// Vector type W and its lane count for a storage type: VecF for float, bf16 and fp16 (converted
// on load), plain double for double (scalar loop, used by gradcheck).
template <typename scalar_t> struct Lanes {
  using W = VecF;
  static constexpr int64_t L = kVecF;
  static W load(const scalar_t* p) { return vload<VecF>(p); }
  // n < L columns; the lanes past them are -inf (padding must add nothing to the sums).
  static W load_partial(const scalar_t* p, int64_t n) { return vload_partial(p, n, -INFINITY); }
};
template <> struct Lanes<double> {
  using W = double;
  static constexpr int64_t L = 1;
  static W load(const double* p) { return *p; }
  static W load_partial(const double*, int64_t) { return -INFINITY; }
};

#if defined(CPU_CAPABILITY_AVX512)
// ---------------------------------------------------------------- AVX-512: two passes per row
// 2^t for t <= 0, -inf and NaN: t = floor(t) + f with f in [0, 1) by vreduceps, 2^f by a degree-6
// polynomial (fitted to the relative error on [0, 1); truncation 2e-9, inside fp32
// rounding), times 2^floor(t) by vscalefps (which floors its exponent and rounds underflow to 0).
// vreduceps(-inf) = 0 and vscalefps(1, -inf) = 0, so -inf needs no clamp; NaN stays NaN.
inline __m512 exp2_nonpositive(__m512 t) {
  static constexpr float kC[7] = {1.000000000e+00f, 6.931470633e-01f, 2.402293086e-01f,
                                  5.548528209e-02f, 9.675451554e-03f, 1.246784464e-03f,
                                  2.161291923e-04f};
  const __m512 f = _mm512_reduce_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 p = _mm512_set1_ps(kC[6]);
  for (int k = 5; k >= 0; --k) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kC[k]));
  return _mm512_scalef_ps(p, t);
}

// The row's statistics in two passes: its max m (one vmaxps per vector), then
// e_j = 2^((x_j - m) inv_t log2 e) summed over the row, which is in L2 by then (a 152k-column
// fp32 row is 0.6 MiB). No per-block rescale and no clamp: about 10 vector operations per 16
// columns against the online form's 17. Returned in the online form's units: m * inv_t,
// s = sum e_j, u = sum e_j (z_j - max z) = ln 2 sum e_j t_j.
template <bool kEntropy, typename scalar_t>
SoftmaxStats<float> row_stats_two_pass(const scalar_t* x, int64_t V, float inv_t) {
  using Ld = Lanes<scalar_t>;
  constexpr int64_t L = kVecF;
  const int64_t V4 = V / (4 * L) * (4 * L), V1 = V / L * L;
  __m512 mx[4];
  for (auto& v : mx) v = _mm512_set1_ps(-INFINITY);
  int64_t j = 0;
  for (; j < V4; j += 4 * L)
    for (int k = 0; k < 4; ++k) mx[k] = _mm512_max_ps(mx[k], __m512(Ld::load(x + j + k * L)));
  for (; j < V1; j += L) mx[0] = _mm512_max_ps(mx[0], __m512(Ld::load(x + j)));
  if (j < V) mx[1] = _mm512_max_ps(mx[1], __m512(Ld::load_partial(x + j, V - j)));
  const float m = _mm512_reduce_max_ps(
      _mm512_max_ps(_mm512_max_ps(mx[0], mx[1]), _mm512_max_ps(mx[2], mx[3])));
  if (m == -INFINITY) return {-INFINITY, 0.f, 0.f};  // every column masked: p undefined, s = 0
  const __m512 vm = _mm512_set1_ps(m);
  const __m512 vc = _mm512_set1_ps(static_cast<float>(inv_t * 1.4426950408889634));
  const __m512 lo = _mm512_set1_ps(-FLT_MAX);  // e * t of a -inf column: 0 * -FLT_MAX, not NaN
  __m512 s[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
  __m512 u[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
  auto add = [&](int a, __m512 xv) {
    const __m512 t = _mm512_mul_ps(_mm512_sub_ps(xv, vm), vc);  // exact shift, then one rounding
    const __m512 e = exp2_nonpositive(t);
    s[a] = _mm512_add_ps(s[a], e);
    if constexpr (kEntropy) u[a] = _mm512_fmadd_ps(e, _mm512_max_ps(t, lo), u[a]);
  };
  for (j = 0; j + 2 * L <= V; j += 2 * L) {
    add(0, __m512(Ld::load(x + j)));
    add(1, __m512(Ld::load(x + j + L)));
  }
  for (; j < V1; j += L) add(0, __m512(Ld::load(x + j)));
  if (j < V) add(1, __m512(Ld::load_partial(x + j, V - j)));  // -inf lanes add 0
  const float su = _mm512_reduce_add_ps(_mm512_add_ps(s[0], s[1]));
  const float uu = kEntropy ? _mm512_reduce_add_ps(_mm512_add_ps(u[0], u[1])) : 0.f;
  return {m * inv_t, su, uu * 0.6931471805599453f};
}
#endif

// Softmax statistics of one row of V columns, z = x * inv_t: per-lane online stats over blocks
// of kBlock vectors, then the lanes merged in a fixed order.
template <bool kEntropy, typename scalar_t, typename acc_t>
SoftmaxStats<acc_t> row_stats(const scalar_t* x, int64_t V, acc_t inv_t) {
  using Ld = Lanes<scalar_t>;
  using W = typename Ld::W;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<W, VecF>) return row_stats_two_pass<kEntropy>(x, V, inv_t);
#endif
  constexpr int64_t L = Ld::L;
  constexpr int64_t B = kBlock * L;
  SoftmaxStats<W> st{W(-INFINITY), W(0), W(0)};
  const W scale(inv_t);
  W z[kBlock];
  int64_t j = 0;
  for (; j + B <= V; j += B) {
    for (int k = 0; k < kBlock; ++k) z[k] = Ld::load(x + j + k * L) * scale;
    softmax_stats_add_block<kEntropy, kBlock>(st, z, ExpNonPositive{});
  }
  if (j < V) {  // last, partial block
    for (int k = 0; k < kBlock; ++k) {
      const int64_t n = V - j - k * L;
      z[k] = n >= L ? Ld::load(x + j + k * L) * scale
                    : (n > 0 ? Ld::load_partial(x + j + k * L, n) * scale : W(-INFINITY));
    }
    softmax_stats_add_block<kEntropy, kBlock>(st, z, ExpNonPositive{});
  }
  if constexpr (L == 1) {
    return st;
  } else {
    float m[L], s[L], u[L];
    st.m.store(m);
    st.s.store(s);
    st.u.store(u);
    SoftmaxStats<float> r{m[0], s[0], u[0]};
    for (int64_t l = 1; l < L; ++l) r = softmax_stats_merge(r, SoftmaxStats<float>{m[l], s[l], u[l]});
    return r;
  }
}

// dz for one row (see logprobs_grad / logprobs_grad_target in token_logprobs.h); in == out in place.
template <typename scalar_t, typename acc_t>
void row_grad(const scalar_t* in, scalar_t* out, int64_t V, int64_t y, acc_t lse, acc_t mean_z,
              acc_t g_lp, acc_t g_ent, acc_t inv_t) {
  const acc_t z_y = static_cast<acc_t>(in[y]) * inv_t;  // read before the loop overwrites it
  const acc_t c0 = -g_lp * inv_t, c1 = -g_ent * inv_t;
  int64_t j = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    const VecF s(inv_t), l(lse), mz(mean_z), a(c0), b(c1);
    for (; j + VecF::size() <= V; j += VecF::size()) {
      logprobs_grad(VecF::loadu(in + j) * s, l, mz, a, b).store(out + j);
    }
  } else if constexpr (!std::is_same_v<scalar_t, double>) {  // bf16 / fp16: as fp32 lanes
    const VecF s(inv_t), l(lse), mz(mean_z), a(c0), b(c1);
    for (; j + kVecF <= V; j += kVecF) {
      store_float(out + j, logprobs_grad(load_float(in + j) * s, l, mz, a, b));
    }
  }
  for (; j < V; ++j) {
    out[j] = static_cast<scalar_t>(
        logprobs_grad(static_cast<acc_t>(in[j]) * inv_t, lse, mean_z, c0, c1));
  }
  out[y] = static_cast<scalar_t>(logprobs_grad_target(z_y, lse, mean_z, g_lp, g_ent, inv_t));
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> token_logprobs_cpu(
    const Tensor& logits, const Tensor& labels, double temperature, bool with_entropy,
    int64_t ignore_index, bool /*inplace_backward: autograd only*/) {
  const LogprobsForwardArgs a = logprobs_forward_args(logits, labels, temperature, with_entropy);
  const int64_t V = a.V;
  std::atomic<int64_t> bad_row{-1};
  PPK_DISPATCH_FLOATING(a.x.scalar_type(), "token_logprobs_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* base = a.x.const_data_ptr<scalar_t>();
    const int64_t* y = a.lab.const_data_ptr<int64_t>();
    acc_t* lp = a.lp.mutable_data_ptr<acc_t>();
    acc_t* ent = with_entropy ? a.ent.mutable_data_ptr<acc_t>() : nullptr;
    acc_t* ls = a.lse.mutable_data_ptr<acc_t>();
    const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
    torch::stable::parallel_for(0, a.n, row_grain(V), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t label = y[r];
        const bool ignored = label == ignore_index;
        if (ignored || label < 0 || label >= V) {  // out of range: reported after the loop
          if (!ignored) bad_row.store(r);
          lp[r] = ls[r] = ignored ? acc_t(0) : std::numeric_limits<acc_t>::quiet_NaN();
          if (ent) ent[r] = lp[r];
          continue;
        }
        const scalar_t* row = base + a.layout.offset(r);
        const SoftmaxStats<acc_t> st = with_entropy ? row_stats<true>(row, V, inv_t)
                                                    : row_stats<false>(row, V, inv_t);
        const acc_t l = softmax_stats_lse(st);
        ls[r] = l;
        // log p_y <= 0 and H >= 0 exactly; rounding may cross by an ulp on a peaked row
        lp[r] = vmin(static_cast<acc_t>(row[label]) * inv_t - l, acc_t(0));
        if (ent) ent[r] = vmax(softmax_stats_entropy(st), acc_t(0));
      }
    });
  });
  const int64_t r = bad_row.load();
  // a RuntimeError (the stable ABI carries no IndexError); a.lab is contiguous: r is its index
  PPK_CHECK(r < 0, "token_logprobs: labels contains ", a.lab.const_data_ptr<int64_t>()[r],
            " (flat index ", r, "), outside [0, V) for V = ", V,
            " and not ignore_index = ", ignore_index);
  return {a.lp, a.ent, a.lse};
}

namespace {
// dz of every row into a.dst (token_logprobs_backward and its in-place form, token_logprobs_args.h).
void backward_cpu(const LogprobsBackwardArgs& a, double inv_temperature, int64_t ignore_index) {
  const int64_t V = a.V;
  PPK_DISPATCH_FLOATING(a.x.scalar_type(), "token_logprobs_bwd_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* in = a.x.const_data_ptr<scalar_t>();
    scalar_t* o = a.dst.mutable_data_ptr<scalar_t>();
    const int64_t* y = a.lab.const_data_ptr<int64_t>();
    const acc_t* glp = a.g_lp.const_data_ptr<acc_t>();
    const acc_t* gent = a.has_ent ? a.g_ent.const_data_ptr<acc_t>() : nullptr;
    const acc_t* h = a.has_ent ? a.ent.const_data_ptr<acc_t>() : nullptr;
    const acc_t* l = a.lse.const_data_ptr<acc_t>();
    const acc_t inv_t = static_cast<acc_t>(inv_temperature);
    torch::stable::parallel_for(0, a.n, row_grain(V), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t label = y[r];
        const acc_t gl = glp[r], ge = gent ? gent[r] : acc_t(0);
        scalar_t* orow = o + a.out_layout.offset(r);
        // ignored tokens, and tokens whose upstream gradients are both 0 (PPO-clipped), get 0
        if (label == ignore_index || label < 0 || label >= V || (gl == 0 && ge == 0)) {
          std::memset(static_cast<void*>(orow), 0, V * sizeof(scalar_t));
          continue;
        }
        const acc_t mean_z = h ? softmax_mean_logit(l[r], h[r]) : acc_t(0);
        row_grad(in + a.in_layout.offset(r), orow, V, label, l[r], mean_z, gl, ge, inv_t);
      }
    });
  });
}
}  // namespace

// This level's kernels, registered by csrc/cpu_isa.cpp when the running CPU selects the level.
void register_token_logprobs(Library& m) {
  m.impl("token_logprobs", TORCH_BOX(&token_logprobs_cpu));
  m.impl("token_logprobs_backward", TORCH_BOX(&token_logprobs_backward_op<backward_cpu>));
  m.impl("token_logprobs_backward_", TORCH_BOX(&token_logprobs_backward_inplace_op<backward_cpu>));
}

}  // namespace ppokernels::CPU_CAPABILITY
