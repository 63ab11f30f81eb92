// The SIMD kernels of the gae family on the CPU (csrc/cpu/gae.cpp): kVecF rows, or chunks of
// rows, advance together, one per lane, through the tiles of cpu_tile.h. Included by gae.cpp
// only, once per ISA level.
#pragma once
#include "ppokernels/cpu_tile.h"
#include "ppokernels/cpu_vec.h"
#include "ppokernels/gae.h"

namespace ppokernels::CPU_CAPABILITY {
namespace gae_simd {

// ---------------------------------------------------------------- fp32 / fp16 / bf16: SIMD
// kVecF rows [b, b + rows) advance together, one per lane, kVecF steps per tile (cpu_tile.h):
// the arithmetic of each row is that of the scalar scan (gae.cpp), step for step, so a row's
// result does not depend on its neighbours or the thread count. Lanes past `rows` run on zeros.

// How many tiles ahead the scans ask for their input lines (cpu_tile.h prefetch_tile).
constexpr int64_t kPrefetchTiles = 4;

// Few long rows (simd_chunks in gae.cpp) run with one chunk of a row per lane, in two passes:
// first each lane composes its chunk's maps (kCompose: nothing stored), then each lane scans its
// chunk from the state that the chunks after it (before it, for the adjoint) leave. Lane k starts
// at tile `skew ? k : 0` and ends len / kVecF tiles later; its state is set at the start (in the
// compose pass to the identity) and, composing, taken at the end, since the zero steps outside a
// lane's chunk are not the identity in zero mode.
struct LaneChunks {
  const float* init[3] = {};       // kVecF per lane: the starting state (x0, x1, m_prev)
  Affine<float>* maps = nullptr;   // kCompose: the composed map of each lane's chunk
};

template <typename V>
inline Affine<V> affine_select(decltype(V(0) == V(0)) c, const Affine<V>& x, const Affine<V>& y) {
  return {vselect(c, x.P, y.P), vselect(c, x.Q, y.Q), vselect(c, x.D, y.D), vselect(c, x.c0, y.c0),
          vselect(c, x.c1, y.c1)};
}

// The tiles of a group of `rows` rows of len steps: `skew` (cpu_tile.h tile_skew), the tile count,
// and each lane's first and last tile as vectors (lane k starts at tile k with the skew, else 0;
// `starting` tiles have a lane starting in them).
struct GroupTiles {
  int64_t skew, per_lane, tiles, starting;
  SimdF start, end;
  GroupTiles(int64_t rows, int64_t len)
      : skew(tile_skew(len)),
        per_lane((len + kVecF - 1) / kVecF),
        tiles(per_lane + (skew ? rows - 1 : 0)),
        starting(skew ? rows : 1) {
    alignas(64) float k[kVecF];
    for (int64_t i = 0; i < kVecF; ++i) k[i] = skew ? float(i) : 0.f;
    start = vload<SimdF>(k);
    end = start + SimdF(float(per_lane - 1));
  }
};

inline void store_maps(const Affine<SimdF>& m, int64_t rows, Affine<float>* out) {
  alignas(64) float f[5][kVecF];
  vstore(f[0], m.P), vstore(f[1], m.Q), vstore(f[2], m.D), vstore(f[3], m.c0), vstore(f[4], m.c1);
  for (int64_t k = 0; k < rows; ++k) out[k] = {f[0][k], f[1][k], f[2][k], f[3][k], f[4][k]};
}

// Reverse scan (forward pass). `values` null: discounted returns; `returns` may be null. Tile
// i ends kVecF i steps before the end of row 0 (rows further down lag by `skew`); a lane before
// its row's end runs on zeros with m = 0, which leave its zero state unchanged, and one past its
// row's start is never stored.
template <MaskMode kMode, bool kCompose = false, typename scalar_t>
void scan_group(const scalar_t* rewards, const scalar_t* values, const bool* mask,
                float* advantages, float* returns, int64_t rows, int64_t len, float gamma,
                float lam, const LaneChunks* chunks = nullptr) {
  SimdF nv(0.f), a(0.f);
  Affine<SimdF> map = affine_identity<SimdF>(), out = map;
  const SimdF g(gamma), l(lam);
  const GroupTiles plan(rows, len);
  const int64_t skew = plan.skew;
  for (int64_t i = 0; i < plan.tiles; ++i) {
    if (chunks && i < plan.starting) {
      const auto now = plan.start == SimdF(float(i));
      if constexpr (kCompose) {
        map = affine_select(now, affine_identity<SimdF>(), map);
      } else {
        nv = vselect(now, vload<SimdF>(chunks->init[0]), nv);
        a = vselect(now, vload<SimdF>(chunks->init[1]), a);
      }
    }
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
      const Affine<SimdF> step = gae_step(mc, r[c], vc, g, l, kMode);
      if constexpr (kCompose) {
        map = affine_after(step, map);
        continue;
      }
      affine_apply(step, nv, a);
      r[c] = a;  // the tiles are reused for the outputs
      if (returns) v[c] = gae_return(a, mc, vc, kMode);
    }
    if constexpr (kCompose) {
      out = affine_select(plan.end == SimdF(float(i)), map, out);
    } else {
      store_tile(r, advantages, len, rows, t0, skew, len);
      if (returns) store_tile(v, returns, len, rows, t0, skew, len);
    }
  }
  if constexpr (kCompose) store_maps(out, rows, chunks->maps);
}

// Forward-time adjoint scan (backward pass). g_adv null: discounted returns; grad_values may be
// null. Tile i starts kVecF i steps into row 0; a lane before its row's start runs on zeros with
// m = 0, which leave its zero state (and m_prev = 0) unchanged.
template <MaskMode kMode, bool kCompose = false, typename scalar_t>
void adjoint_group(const float* g_adv, const float* g_ret, const bool* mask,
                   scalar_t* grad_rewards, scalar_t* grad_values, int64_t rows, int64_t len,
                   float gamma, float lam, const LaneChunks* chunks = nullptr) {
  SimdF la(0.f), lnv(0.f), m_prev(0.f);
  Affine<SimdF> map = affine_identity<SimdF>(), out = map;
  const SimdF g(gamma), l(lam);
  const GroupTiles plan(rows, len);
  const int64_t skew = plan.skew;
  for (int64_t i = 0; i < plan.tiles; ++i) {
    if (chunks && i < plan.starting) {
      const auto now = plan.start == SimdF(float(i));
      m_prev = vselect(now, vload<SimdF>(chunks->init[2]), m_prev);
      if constexpr (kCompose) {
        map = affine_select(now, affine_identity<SimdF>(), map);
      } else {
        la = vselect(now, vload<SimdF>(chunks->init[0]), la);
        lnv = vselect(now, vload<SimdF>(chunks->init[1]), lnv);
      }
    }
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
      const Affine<SimdF> step = gae_adjoint_step(m_prev, gc, g, l, kMode);
      m_prev = mc;
      if constexpr (kCompose) {
        map = affine_after(step, map);
        continue;
      }
      affine_apply(step, la, lnv);
      SimdF dr, dv;
      gae_grads(la, lnv, mc, grc, kMode, dr, dv);
      ga[c] = dr;
      gr[c] = dv;
    }
    if constexpr (kCompose) {
      out = affine_select(plan.end == SimdF(float(i)), map, out);
    } else {
      store_tile(ga, grad_rewards, len, rows, t0, -skew, len);
      if (grad_values) store_tile(gr, grad_values, len, rows, t0, -skew, len);
    }
  }
  if constexpr (kCompose) store_maps(out, rows, chunks->maps);
}

}  // namespace gae_simd
}  // namespace ppokernels::CPU_CAPABILITY
