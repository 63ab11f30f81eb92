// GAE and discounted returns as a reverse scan of 2x2 lower-triangular affine maps.
//
// State after position t (time runs backwards): x = (nv, a), nv = the value the TD error at t-1
// bootstraps from, a = the running advantage. One position applies
//     nv' = p nv + c0             p = 1 - m (skip) or 0 (zero)
//     a'  = q nv + d a + c1       q = gamma m (skip) or gamma (zero); d = 1 - m + m gamma lam
//                                 (skip) or gamma lam (zero); c0 = m V_t, c1 = m (r_t - V_t)
// so with m = 1 both modes give  delta = r + gamma nv - V,  a' = delta + gamma lam a,  nv' = V, and
// with m = 0 "skip" leaves (nv, a) unchanged while "zero" runs through a zero-reward zero-value step.
// advantages_t = a after position t. Discounted returns are the same scan with V = 0, lam = 1.
//
// Written over A = float, double or a SIMD vector of floats (one row per lane on the CPU), with
// vselect for the choices (common.h).
//
// Maps compose associatively, which gives a parallel (chunked) scan on GPUs, and the backward is the
// transposed scan forward in time: with lambda = dL/dx,
//     lambda_t = M_{t-1}^T lambda_{t-1} + (0, g_t),   g_t = upstream gradient of advantages_t,
// and dr_t = m_t lambda_a,  dV_t = m_t (lambda_nv - lambda_a).  In the basis (lambda_a, lambda_nv)
// M^T is again lower triangular ((d, 0), (q, p)), so both directions use the same Affine type.
#pragma once
#include "ppokernels/common.h"

namespace ppokernels {

// x0' = P x0 + c0,  x1' = Q x0 + D x1 + c1
template <typename A>
struct Affine {
  A P, Q, D, c0, c1;
};

template <typename A>
PPK_HOST_DEVICE Affine<A> affine_identity() {
  return {A(1), A(0), A(1), A(0), A(0)};
}

// g after f: x -> g(f(x)).
template <typename A>
PPK_HOST_DEVICE Affine<A> affine_after(const Affine<A>& g, const Affine<A>& f) {
  return {g.P * f.P, g.Q * f.P + g.D * f.Q, g.D * f.D, g.P * f.c0 + g.c0,
          g.Q * f.c0 + g.D * f.c1 + g.c1};
}

template <typename A>
PPK_HOST_DEVICE void affine_apply(const Affine<A>& f, A& x0, A& x1) {
  const A y0 = f.P * x0 + f.c0;
  x1 = f.Q * x0 + f.D * x1 + f.c1;
  x0 = y0;
}

// Coefficients (p, q, d) of one position with mask m in {0, 1}.
template <typename A>
PPK_HOST_DEVICE void gae_coeffs(A m, A gamma, A lam, MaskMode mode, A& p, A& q, A& d) {
  if (mode == MaskMode::kSkip) {
    p = A(1) - m;
    q = gamma * m;
    d = A(1) - m + m * gamma * lam;
  } else {
    p = A(0);
    q = gamma;
    d = gamma * lam;
  }
}

// Forward map of position t (reverse-time scan); v = 0 for discounted returns. The reward and
// value of a masked position are never read (selected away, not multiplied by 0), so padding
// may hold anything, NaN included.
template <typename A>
PPK_HOST_DEVICE Affine<A> gae_step(A m, A r, A v, A gamma, A lam, MaskMode mode) {
  A p, q, d;
  gae_coeffs(m, gamma, lam, mode, p, q, d);
  const auto valid = m != A(0);
  return {p, q, d, vselect(valid, v, A(0)), vselect(valid, r - v, A(0))};
}

// Adjoint map into position t (forward-time scan), built from position t-1's mask (m_prev) and the
// upstream gradient g of advantages_t; state (lambda_a, lambda_nv). At t = 0 the incoming state is
// zero, so the coefficients do not matter (pass m_prev = 0).
template <typename A>
PPK_HOST_DEVICE Affine<A> gae_adjoint_step(A m_prev, A g, A gamma, A lam, MaskMode mode) {
  A p, q, d;
  gae_coeffs(m_prev, gamma, lam, mode, p, q, d);
  return {d, q, p, g, A(0)};
}

// returns_t = advantages_t + (V_t in skip mode, m_t V_t in zero mode).
template <typename A>
PPK_HOST_DEVICE A gae_return(A adv, A m, A v, MaskMode mode) {
  return adv + (mode == MaskMode::kSkip ? v : vselect(m != A(0), v, A(0)));
}

// Gradients at position t from the adjoint state (la = lambda_a, lnv = lambda_nv) and the upstream
// gradient of returns_t (which reaches V_t directly, and the advantages through g).
template <typename A>
PPK_HOST_DEVICE void gae_grads(A la, A lnv, A m, A g_ret, MaskMode mode, A& dr, A& dv) {
  dr = m * la;
  dv = m * (lnv - la) + (mode == MaskMode::kSkip ? g_ret : m * g_ret);
}

// Host-side parser of the mask mode: "skip" | "zero". False if unknown.
inline bool parse_mask_mode(const char* name, MaskMode* mode) {
  const char s[] = "skip", z[] = "zero";
  bool is_skip = true, is_zero = true;
  int i = 0;
  for (; name[i] != 0 && i < 4; ++i) {
    is_skip = is_skip && name[i] == s[i];
    is_zero = is_zero && name[i] == z[i];
  }
  if (i != 4 || name[4] != 0 || !(is_skip || is_zero)) return false;
  *mode = is_skip ? MaskMode::kSkip : MaskMode::kZero;
  return true;
}

}  // namespace ppokernels
