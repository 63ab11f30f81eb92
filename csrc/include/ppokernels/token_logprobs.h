// Per-row softmax statistics shared by token_logprobs (from logits) and linear_logprobs (from
// hidden states): an online log-sum-exp that also carries what the entropy needs.
//
// For a row of temperature-scaled logits z (z = logits / temperature), over the columns seen so far:
//   m = max z                        (identity -inf: padded columns are -inf and add nothing)
//   s = sum exp(z - m)
//   u = sum exp(z - m) * (z - m)     (shifted by m, so a peaked row does not cancel large numbers)
// Then  lse = m + log s,  log p_y = z_y - lse,  E_p[z] = m + u / s,  H = lse - E_p[z] = log s - u / s.
#pragma once
#include <cfloat>

#include "ppokernels/common.h"

namespace ppokernels {

template <typename T>
struct SoftmaxStats {
  T m, s, u;
};

template <typename T>
PPK_HOST_DEVICE SoftmaxStats<T> softmax_stats_init() {
  return {-INFINITY, T(0), T(0)};
}

// Rescales stats kept relative to max m to a new max m_new >= m.
template <typename T>
PPK_HOST_DEVICE void softmax_stats_rescale(SoftmaxStats<T>& a, T m_new) {
  if (a.m == m_new) return;  // also covers -inf == -inf (an empty prefix)
  const T d = a.m - m_new;   // <= 0; exp(-inf) = 0 for an empty prefix
  const T c = PPK_MATH(exp)(d);
  // An empty prefix (s = 0, m = -inf) has u = 0; d * s would be -inf * 0 = NaN.
  a.u = c * (a.u + (a.s == T(0) ? T(0) : d * a.s));
  a.s = c * a.s;
  a.m = m_new;
}

// Adds one column z.
template <typename T>
PPK_HOST_DEVICE void softmax_stats_add(SoftmaxStats<T>& a, T z) {
  if (z > a.m) softmax_stats_rescale(a, z);
  if (z == -INFINITY) return;
  const T d = z - a.m;
  const T e = PPK_MATH(exp)(d);
  a.s += e;
  a.u += e * d;
}

// Merges the stats of two disjoint column sets (order-independent up to rounding).
template <typename T>
PPK_HOST_DEVICE SoftmaxStats<T> softmax_stats_merge(SoftmaxStats<T> a, SoftmaxStats<T> b) {
  const T m = a.m > b.m ? a.m : b.m;
  if (m == -INFINITY) return a;
  softmax_stats_rescale(a, m);
  softmax_stats_rescale(b, m);
  return {m, a.s + b.s, a.u + b.u};
}

// A +inf logit (an overflow upstream) leaves the softmax undefined: lse is NaN then, so every
// log-prob and the entropy of that row are NaN, as torch.log_softmax gives (not -inf for the
// other labels, which m + log s = +inf would give).
template <typename T>
PPK_HOST_DEVICE T softmax_stats_lse(const SoftmaxStats<T>& a) {
  return a.m == T(INFINITY) ? T(NAN) : a.m + PPK_MATH(log)(a.s);
}

// Entropy of the softmax: log s - u / s.
template <typename T>
PPK_HOST_DEVICE T softmax_stats_entropy(const SoftmaxStats<T>& a) {
  return PPK_MATH(log)(a.s) - a.u / a.s;
}

// ---------------------------------------------------------------- vectorised (branch-free) forms
// The functions below are generic over T = float, double or a SIMD vector of floats (VecOps in
// common.h), so one definition serves the CPU SIMD lanes, the scalar tails and the CUDA threads.
// With a SIMD T every lane keeps its own statistics; merge the lanes with softmax_stats_merge.

// Adds a block of K columns z[0..K) (already divided by the temperature; padding columns -inf):
// one rescale of the running stats per block and one exp per column. With kEntropy = false,
// u is not maintained (only lse is wanted). NaN columns make m, hence lse, NaN.
template <bool kEntropy, int K, typename T, typename Exp>
PPK_HOST_DEVICE void softmax_stats_add_block(SoftmaxStats<T>& a, const T* z, Exp exp_fn) {
  T mb = z[0];
#pragma unroll
  for (int k = 1; k < K; ++k) mb = vmax(mb, z[k]);
  const T m_new = vmax(a.m, mb);
  // Rescale to m_new: a.m == m_new (also -inf == -inf) needs none; an empty prefix (a.m = -inf)
  // has c = 0, where c * d = 0 * -inf must read 0.
  const T d = vselect(a.m == m_new, T(0), a.m - m_new);
  const T c = exp_fn(d);
  // Shift by 0 while the max is still -inf, so -inf columns give exp(-inf) = 0, not NaN.
  const T base = vselect(m_new == T(-INFINITY), T(0), m_new);
  T s = T(0), u = T(0);
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const T x = z[k] - base;
    const T e = exp_fn(x);
    s = s + e;
    // e * x with x = -inf (a masked column) is 0 * -inf: clamp x to a finite value first.
    if constexpr (kEntropy) u = u + e * vmax(x, T(-FLT_MAX));
  }
  if constexpr (kEntropy) a.u = c * a.u + vselect(c > T(0), c * d, T(0)) * a.s + u;
  a.s = c * a.s + s;
  a.m = m_new;
}

// The exp of VecOps (vexp): std::exp / CUDA's expf, VecF::exp (cpu_vecf.h) on SIMD vectors.
struct DefaultExp {
  template <typename T>
  PPK_HOST_DEVICE T operator()(T x) const { return vexp(x); }
};

template <bool kEntropy, int K, typename T>
PPK_HOST_DEVICE void softmax_stats_add_block(SoftmaxStats<T>& a, const T* z) {
  softmax_stats_add_block<kEntropy, K>(a, z, DefaultExp{});
}

// Expected logit E_p[z] = m + u / s, recovered in the backward from the saved lse and entropy.
template <typename T>
PPK_HOST_DEVICE T softmax_mean_logit(T lse, T entropy) {
  return lse - entropy;
}

// d(loss)/dz_j for a non-target column j (the target is fixed up by logprobs_grad_target):
//   dz_j = -p_j * (g_lp + g_ent * (z_j - E_p[z])) / T,   p_j = exp(z_j - lse)
// c0 = -g_lp / T, c1 = -g_ent / T. A column with p_j = 0 (e.g. z_j = -inf) gets exactly 0
// (the product would be 0 * -inf = NaN); NaN stays NaN.
template <typename T, typename Exp>
PPK_HOST_DEVICE T logprobs_grad(T z, T lse, T mean_z, T c0, T c1, Exp exp_fn) {
  const T p = exp_fn(z - lse);
  return vselect(p == T(0), T(0), p * (c0 + c1 * (z - mean_z)));
}

template <typename T>
PPK_HOST_DEVICE T logprobs_grad(T z, T lse, T mean_z, T c0, T c1) {
  return logprobs_grad(z, lse, mean_z, c0, c1, DefaultExp{});
}

// d(loss)/dz_y at the target column, where 1 - p_y is -expm1(z_y - lse) (no cancellation when the
// policy is confident, p_y -> 1):
//   dz_y = (g_lp * (1 - p_y) - g_ent * p_y * (z_y - E_p[z])) / T
template <typename T>
PPK_HOST_DEVICE T logprobs_grad_target(T z_y, T lse, T mean_z, T g_lp, T g_ent, T inv_t) {
  const T lp = z_y - lse;
  const T p = PPK_MATH(exp)(lp);
  const T ent_term = p == T(0) ? T(0) : g_ent * p * (z_y - mean_z);
  return (g_lp * -PPK_MATH(expm1)(lp) - ent_term) * inv_t;
}

// Rows of a [..., V] tensor whose leading dimensions coalesce into at most two strided ones
// (e.g. logits[:, :-1] of a [B, S, V] tensor): row r starts at
//   (r / inner) * outer_stride + (r % inner) * inner_stride   (elements; int64 throughout)
struct RowLayout {
  int64_t inner, outer_stride, inner_stride;
  PPK_HOST_DEVICE int64_t offset(int64_t r) const {
    return (r / inner) * outer_stride + (r % inner) * inner_stride;
  }
};

// Builds the RowLayout of the leading dims (sizes/strides of the first `nd` dims); false if they
// do not coalesce into two (the caller then makes the tensor contiguous).
inline bool make_row_layout(const int64_t* sizes, const int64_t* strides, int nd, RowLayout* out) {
  int64_t sz[2] = {1, 1}, st[2] = {0, 0};
  int n = 0;  // dims kept so far (innermost last), merged from the inside out
  for (int i = nd - 1; i >= 0; --i) {
    if (sizes[i] == 1) continue;
    if (n > 0 && strides[i] == st[2 - n] * sz[2 - n]) {
      sz[2 - n] *= sizes[i];  // contiguous with the dim inside it: merge
      continue;
    }
    if (n == 2) return false;
    ++n;
    sz[2 - n] = sizes[i];
    st[2 - n] = strides[i];
  }
  out->inner = sz[1] > 0 ? sz[1] : 1;
  out->inner_stride = st[1];
  out->outer_stride = st[0];
  return true;
}

}  // namespace ppokernels
