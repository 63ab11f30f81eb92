// The SIMD math of csrc/include/ppokernels/cpu_vecf.h against the C library, for one ISA level
// (tests/build/test_cpu_vecf.py compiles this file once per level the running CPU has). Prints the
// largest error in ulp of exp, log and log1p over a sweep of fp32 values, and the count of
// special values (inf, NaN, 0, subnormals) whose result class differs from std::'s; and checks
// the bf16 / fp16 round trips of load_float / store_float against the scalar conversions.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <vector>

#include "ppokernels/cpu_vecf.h"

using namespace ppokernels::CPU_CAPABILITY;
constexpr int L = VecF::size();

// distance in representable floats between two finite floats of the same sign class
double ulps(float got, double want) {
  const float w = static_cast<float>(want);
  if (std::isnan(w) || std::isinf(w) || std::isnan(got) || std::isinf(got)) {
    return (std::isnan(w) == std::isnan(got) && (std::isnan(w) || got == w)) ? 0.0 : 1e30;
  }
  const double spacing = std::nextafter(std::fabs(w), INFINITY) - std::fabs(w);
  return std::fabs(got - want) / spacing;
}

template <typename F, typename G>
void sweep(const char* name, const std::vector<float>& xs, F vec, G ref) {
  double worst = 0;
  float worst_x = 0;
  for (size_t i = 0; i + L <= xs.size(); i += L) {
    float out[L];
    vec(VecF::loadu(xs.data() + i)).store(out);
    for (int k = 0; k < L; ++k) {
      const double u = ulps(out[k], ref(static_cast<double>(xs[i + k])));
      if (u > worst) worst = u, worst_x = xs[i + k];
    }
  }
  std::printf("%s %.3f %.9g\n", name, worst, worst_x);
}

int main() {
  std::vector<float> xs;
  for (float x = -104.f; x <= 89.f; x += 0.0137f) xs.push_back(x);  // exp's range
  for (float x : {-INFINITY, INFINITY, NAN, 0.f, -0.f, 88.72f, 88.73f, -87.3f, -103.9f, 1e-30f})
    xs.push_back(x);
  while (xs.size() % L) xs.push_back(0.f);
  sweep("exp", xs, [](VecF v) { return v.exp(); }, [](double x) { return std::exp(x); });

  std::vector<float> pos;
  for (float x = 1e-38f; x < 3e38f; x *= 1.0009f) pos.push_back(x);
  for (float x = 0.5f; x < 2.f; x += 1e-4f) pos.push_back(x);  // around 1, where log cancels
  for (float x : {0.f, INFINITY, NAN, -1.f, 1e-40f, 1.4e-45f, -INFINITY, 1.f})
    pos.push_back(x);
  while (pos.size() % L) pos.push_back(1.f);
  sweep("log", pos, [](VecF v) { return v.log(); }, [](double x) { return std::log(x); });

  std::vector<float> small;
  for (float x = -0.999f; x < 10.f; x += 1.3e-4f) small.push_back(x);
  for (float x = 1e-30f; x < 1e-2f; x *= 1.01f) small.push_back(x), small.push_back(-x);
  for (float x : {-1.f, INFINITY, NAN, 0.f, 1e30f}) small.push_back(x);
  while (small.size() % L) small.push_back(0.f);
  sweep("log1p", small, [](VecF v) { return v.log1p(); }, [](double x) { return std::log1p(x); });

  // bf16 / fp16 round trips: store_float rounds as the scalar conversion does, load_float is exact
  int bad = 0;
  for (size_t i = 0; i + L <= xs.size(); i += L) {
    c10::BFloat16 b[L];
    c10::Half h[L];
    const VecF v = VecF::loadu(xs.data() + i) * VecF(0.37f);
    store_float(b, v);
    store_float(h, v);
    float lb[L], lh[L], vv[L];
    load_float(b).store(lb);
    load_float(h).store(lh);
    v.store(vv);
    for (int k = 0; k < L; ++k) {
      const float sb = static_cast<float>(c10::BFloat16(vv[k]));
      const float sh = static_cast<float>(c10::Half(vv[k]));
      if (std::memcmp(&lb[k], &sb, 4) != 0 && !(std::isnan(sb) && std::isnan(lb[k]))) ++bad;
      if (std::memcmp(&lh[k], &sh, 4) != 0 && !(std::isnan(sh) && std::isnan(lh[k]))) ++bad;
    }
  }
  std::printf("half_roundtrip_mismatches %d 0\n", bad);
  return 0;
}
