// SIMD specialisation of the generic math (VecOps in common.h) for ATen's Vectorized<float>, so
// the per-element functions of csrc/include/ppokernels/<stem>.h run unchanged on SIMD registers
// in the CPU kernels. setup.py builds with AVX2 + FMA where the build machine has them, which
// selects ATen's AVX2 Vectorized and SLEEF's vector exp/log from libtorch.
#pragma once
#include <ATen/cpu/vec/vec.h>

#include "ppokernels/common.h"

namespace ppokernels {

using VecF = at::vec::Vectorized<float>;

template <>
struct VecOps<VecF> {
  static VecF abs(VecF x) { return x.abs(); }
  // ATen's polynomial exp (max error ~2 ulp in float), several times faster than SLEEF's u10.
  static VecF exp(VecF x) { return x.exp_u20(); }
  static VecF log(VecF x) { return x.log(); }
  static VecF log1p(VecF x) { return x.log1p(); }
  static VecF select(VecF mask, VecF a, VecF b) { return VecF::blendv(b, a, mask); }
  static VecF min(VecF a, VecF b) { return at::vec::minimum(a, b); }
  static VecF max(VecF a, VecF b) { return at::vec::maximum(a, b); }
};

}  // namespace ppokernels
