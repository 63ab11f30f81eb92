// The one registration of the CPU kernels: picks the ISA level from the running CPU when the
// extension is loaded and registers that level's copy of every kernel (ppokernels/cpu_isa.h).
// Compiled once, without ISA flags, so it runs on any CPU.
#include "ppokernels/cpu_isa.h"

#include <cstdlib>
#include <cstring>

// Levels compiled in: setup.py defines these on x86-64 (a non-x86 build has the DEFAULT level).
namespace ppokernels {
#if defined(PPK_CPU_HAVE_AVX2)
namespace AVX2 {
PPK_CPU_STEMS(PPK_DECLARE_REGISTER)
}  // namespace AVX2
#endif
#if defined(PPK_CPU_HAVE_AVX512)
namespace AVX512 {
PPK_CPU_STEMS(PPK_DECLARE_REGISTER)
}  // namespace AVX512
#endif

namespace {

// What the running CPU (and its OS: __builtin_cpu_supports also checks that the OS saves the
// YMM / ZMM registers) supports, among the levels compiled in.
CpuIsa detect() {
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();  // needed when called from a static initialiser
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("avx512vl");
#if defined(PPK_CPU_HAVE_AVX512)
  if (avx512) return CpuIsa::kAvx512;
#endif
#if defined(PPK_CPU_HAVE_AVX2)
  if (avx2) return CpuIsa::kAvx2;
#endif
  (void)avx2;
  (void)avx512;
#endif
  return CpuIsa::kScalar;
}

// The supported level, or the lower one PPOKERNELS_CPU_ISA names. An unknown or unsupported value
// falls back to the supported level here (a static initialiser must not throw); the Python
// package turns it into an error or a warning naming the variable (ppokernels/_backend.py).
CpuIsa choose(CpuIsa supported) {
  const char* env = std::getenv("PPOKERNELS_CPU_ISA");
  if (env == nullptr || *env == '\0') return supported;
  for (CpuIsa isa : {CpuIsa::kScalar, CpuIsa::kAvx2, CpuIsa::kAvx512}) {
    if (std::strcmp(env, cpu_isa_name(isa)) == 0) {
      return static_cast<int>(isa) <= static_cast<int>(supported) ? isa : supported;
    }
  }
  return supported;
}

struct Choice {
  CpuIsa supported, used;
};
const Choice& choice() {
  static const Choice c = [] {
    const CpuIsa s = detect();
    return Choice{s, choose(s)};
  }();
  return c;
}

}  // namespace

CpuIsa cpu_isa() { return choice().used; }
CpuIsa cpu_isa_supported() { return choice().supported; }

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512:
      return "avx512";
    case CpuIsa::kAvx2:
      return "avx2";
    default:
      return "scalar";
  }
}

#define PPK_REGISTER_DEFAULT(stem) DEFAULT::register_##stem(m);
#define PPK_REGISTER_AVX2(stem) AVX2::register_##stem(m);
#define PPK_REGISTER_AVX512(stem) AVX512::register_##stem(m);

STABLE_TORCH_LIBRARY_IMPL(ppokernels, CPU, m) {
  switch (cpu_isa()) {
#if defined(PPK_CPU_HAVE_AVX512)
    case CpuIsa::kAvx512:
      PPK_CPU_STEMS(PPK_REGISTER_AVX512)
      break;
#endif
#if defined(PPK_CPU_HAVE_AVX2)
    case CpuIsa::kAvx2:
      PPK_CPU_STEMS(PPK_REGISTER_AVX2)
      break;
#endif
    default:
      PPK_CPU_STEMS(PPK_REGISTER_DEFAULT)
  }
}

}  // namespace ppokernels
