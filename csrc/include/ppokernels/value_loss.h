// Per-token math of value_loss, the clipped value loss; the loss aggregates through agg.h.
// Written branch-free over T (float, double or a SIMD vector of floats; common.h), so the CPU SIMD
// loops, the scalar tails and the CUDA threads run the same code.
//
// Value, one token (veRL 0.9.1 verl/trainer/ppo/core_algos.py compute_value_loss; OpenRLHF
// 0.11.2 openrlhf/models/loss.py ValueLoss; docs/semantics.md):
//   vc = clip(v, v_old - clip, v_old + clip),  L = 0.5 max((v - R)^2, (vc - R)^2)
// dL/dv = v - R unless the clipped term strictly wins (then v is outside the range: 0).
#pragma once

#include "ppokernels/common.h"

namespace ppokernels {

// Clipped value loss of one token. clip <= 0 means none. Writes dL/dv and the clip flag.
template <typename T, typename S>
PPK_HOST_DEVICE T value_token(T v, T v_old, T ret, S clip, T* dl_dv, T* clipped) {
  const T err = v - ret;
  const T sq = err * err;
  if (!(clip > S(0))) {
    *dl_dv = err;
    *clipped = T(0);
    return T(0.5) * sq;
  }
  const T vc = vmin(vmax(v, v_old - T(clip)), v_old + T(clip));
  const T errc = vc - ret;
  const T sqc = errc * errc;
  const auto is_clipped = sqc > sq;
  *dl_dv = vselect(is_clipped, T(0), err);
  *clipped = as_flag<T>(is_clipped);
  return T(0.5) * vmax(sq, sqc);
}

}  // namespace ppokernels
