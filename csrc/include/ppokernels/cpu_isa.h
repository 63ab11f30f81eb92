// Runtime ISA dispatch of the CPU kernels, the way ATen does it (with our own SIMD, cpu_vecf.h).
//
// setup.py compiles every CPU kernel source (csrc/cpu/<stem>.cpp) once per level, with that
// level's compiler flags and -DCPU_CAPABILITY=<level> (+ -DCPU_CAPABILITY_<level>, which makes
// VecF of cpu_vecf.h 8 or 16 lanes wide):
//
//   level    CPU_CAPABILITY  flags                                       PPOKERNELS_CPU_ISA
//   0        DEFAULT         none (baseline x86-64, or any non-x86 CPU)   scalar
//   1        AVX2            -mavx2 -mfma -mf16c                           avx2
//   2        AVX512          + -mavx512f -mavx512bw -mavx512dq -mavx512vl   avx512
//
// Each copy lives in its own namespace, ppokernels::<CPU_CAPABILITY> (as ATen's at::vec does), so
// the copies never clash at link time, and ends with register_<stem>(m), which m.impl()s that
// level's kernels. csrc/cpu_isa.cpp, compiled once without ISA flags, holds the only
// STABLE_TORCH_LIBRARY_IMPL(ppokernels, CPU, ...): at load it reads the RUNNING CPU (cpuid through
// __builtin_cpu_supports, never the build machine), takes the best level it supports or the lower
// one PPOKERNELS_CPU_ISA asks for, and calls that level's register_<stem> for every stem. The
// kernels are then called directly (no per-call indirection).
//
// Inline functions of the headers (torch's, the standard library's, the level-independent ones
// of ours) are emitted by every copy; the linker keeps the first, and setup.py links the
// baseline objects first, so code that can run on any CPU never calls a copy compiled for AVX.
#pragma once

#include <torch/csrc/stable/library.h>

// A source compiled without setup.py's per-level flags (make syntax, an IDE) is the DEFAULT one.
#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT
#endif

// Every csrc/cpu/<stem>.cpp; a new kernel source adds its stem here (tests/build/test_cpu_isa.py
// checks the list against the directory).
#define PPK_CPU_STEMS(X) \
  X(gae)                 \
  X(group_advantages)    \
  X(kl_penalty)          \
  X(linear_logprobs)     \
  X(masked_whiten)       \
  X(ppo_policy_loss)     \
  X(rollout_correction)  \
  X(token_logprobs)      \
  X(value_loss)

#define PPK_DECLARE_REGISTER(stem) void register_##stem(torch::stable::detail::StableLibrary& m);

namespace ppokernels {

namespace CPU_CAPABILITY {
PPK_CPU_STEMS(PPK_DECLARE_REGISTER)
}  // namespace CPU_CAPABILITY

// The levels in order; names as PPOKERNELS_CPU_ISA spells them.
enum class CpuIsa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// The level whose kernels are registered (fixed when the extension is loaded).
CpuIsa cpu_isa();
// The best level this CPU supports among those compiled in.
CpuIsa cpu_isa_supported();
const char* cpu_isa_name(CpuIsa isa);

}  // namespace ppokernels
