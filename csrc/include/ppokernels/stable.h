// The torch side of the host code (checks, allocation, dtype dispatch, registration), through
// the LibTorch stable ABI only: torch/csrc/stable and torch/headeronly, built with
// -DTORCH_TARGET_VERSION = 2.11 (setup.py), so one binary loads on every torch from 2.11 on.
// What the stable ABI lacks is written here, once: an error check that throws the message alone,
// a floating-point dtype switch, tensor factories in ATen's words, and a dispatcher call for the
// ATen ops that torch/csrc/stable/ops.h does not wrap (mm, mm.out, nonzero).
#pragma once
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <cstdint>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "ppokernels/common.h"

namespace ppokernels {

using Tensor = torch::stable::Tensor;
using Library = torch::stable::detail::StableLibrary;
using ScalarType = torch::headeronly::ScalarType;
using Half = c10::Half;
using BFloat16 = c10::BFloat16;
using Sizes = std::vector<int64_t>;

constexpr ScalarType kFloat = ScalarType::Float;
constexpr ScalarType kDouble = ScalarType::Double;
constexpr ScalarType kHalf = ScalarType::Half;
constexpr ScalarType kBFloat16 = ScalarType::BFloat16;
constexpr ScalarType kBool = ScalarType::Bool;
constexpr ScalarType kLong = ScalarType::Long;
constexpr ScalarType kInt = ScalarType::Int;

// ---------------------------------------------------------------- errors
// PPK_CHECK(cond, parts...) throws std::runtime_error with the parts concatenated; torch turns it
// into a Python RuntimeError carrying exactly that message ("<op>: <argument> ..."), without the
// function / file / line prefix that STD_TORCH_CHECK adds.
template <typename... Parts>
[[noreturn]] inline void fail(const Parts&... parts) {
  std::ostringstream s;
  (s << ... << parts);
  throw std::runtime_error(s.str());
}
#define PPK_CHECK(cond, ...)                              \
  do {                                                    \
    if (!(cond)) ::ppokernels::fail(__VA_ARGS__);         \
  } while (0)

// A call of torch's C shim (aoti_torch_*, torch_*), which reports failure by its return code:
// torch's own check macro is named differently across versions (TORCH_ERROR_CODE_CHECK in 2.11,
// STABLE_TORCH_ERROR_CODE_CHECK later), so the binary built against 2.11 uses this one.
#define PPK_SHIM_CHECK(call)                                                             \
  do {                                                                                   \
    if ((call) != AOTI_TORCH_SUCCESS) ::ppokernels::fail("torch shim call failed: ", #call); \
  } while (0)

inline const char* dtype_name(ScalarType t) { return torch::headeronly::toString(t); }

// ---------------------------------------------------------------- dtype dispatch
// PPK_DISPATCH_FLOATING(type, "op", [&] { ... scalar_t ... }) runs the lambda with scalar_t =
// double, float, Half or BFloat16 (PPK_DISPATCH_FP32_FP64: float and double only); any other
// dtype is an error naming the op.
// The lambda is variadic (...), as in ATen's AT_DISPATCH_*: a body with a top-level comma
// (f<scalar_t, A>(...)) reaches the macro as several arguments.
#define PPK_DISPATCH_CASE(enum_type, type, ...) \
  case enum_type: {                             \
    using scalar_t = type;                      \
    return __VA_ARGS__();                       \
  }
// The switch both share: CASES are PPK_DISPATCH_CASE lines, EXPECTED names the dtypes taken.
#define PPK_DISPATCH_SWITCH(TYPE, NAME, EXPECTED, CASES)                                \
  [&] {                                                                                 \
    const ::ppokernels::ScalarType ppk_t = (TYPE);                                      \
    switch (ppk_t) {                                                                    \
      CASES                                                                             \
      default:                                                                          \
        ::ppokernels::fail(NAME, ": unsupported dtype ", ::ppokernels::dtype_name(ppk_t), \
                           " (expected " EXPECTED ")");                                 \
    }                                                                                   \
  }()
#define PPK_DISPATCH_FP32_FP64(TYPE, NAME, ...)                                     \
  PPK_DISPATCH_SWITCH(TYPE, NAME, "float32 or float64",                             \
                      PPK_DISPATCH_CASE(::ppokernels::kDouble, double, __VA_ARGS__) \
                      PPK_DISPATCH_CASE(::ppokernels::kFloat, float, __VA_ARGS__))
#define PPK_DISPATCH_FLOATING(TYPE, NAME, ...)                                                \
  PPK_DISPATCH_SWITCH(                                                                        \
      TYPE, NAME, "float64, float32, float16 or bfloat16",                                    \
      PPK_DISPATCH_CASE(::ppokernels::kDouble, double, __VA_ARGS__)                           \
      PPK_DISPATCH_CASE(::ppokernels::kFloat, float, __VA_ARGS__)                             \
      PPK_DISPATCH_CASE(::ppokernels::kHalf, ::ppokernels::Half, __VA_ARGS__)                 \
      PPK_DISPATCH_CASE(::ppokernels::kBFloat16, ::ppokernels::BFloat16, __VA_ARGS__))

// ATen's isFloatingType, as the argument checks used it: the four kernel dtypes plus the float8
// types and float4_e2m1fn_x2 (those then fail at the dispatch, naming the op).
inline bool is_floating_type(ScalarType t) {
  return t == kDouble || t == kFloat || t == kHalf || t == kBFloat16 ||
         t == ScalarType::Float8_e5m2 || t == ScalarType::Float8_e5m2fnuz ||
         t == ScalarType::Float8_e4m3fn || t == ScalarType::Float8_e4m3fnuz ||
         t == ScalarType::Float8_e8m0fnu || t == ScalarType::Float4_e2m1fn_x2;
}

// ---------------------------------------------------------------- shapes and factories
inline Sizes sizes_of(const Tensor& t) {
  const auto s = t.sizes();
  return Sizes(s.begin(), s.end());
}
inline bool same_shape(const Tensor& a, const Tensor& b) { return a.sizes().equals(b.sizes()); }
inline bool same_device(const Tensor& a, const Tensor& b) {
  return a.get_device() == b.get_device() && a.is_cuda() == b.is_cuda();
}
// "[2, 3]", for messages
inline std::string shape_str(const Tensor& t) {
  std::ostringstream s;
  s << "[";
  for (int64_t d = 0; d < t.dim(); ++d) s << (d ? ", " : "") << t.size(d);
  s << "]";
  return s.str();
}

// ---------------------------------------------------------------- factories and conversions
// The stable ops of torch/csrc/stable/ops.h reach most ATen ops through torch_call_dispatcher,
// which looks the schema up by name and boxes every argument on each call: a few microseconds,
// paid many times per small op. The helpers below take the direct C-shim call where there is one
// (aoti_torch_empty_strided, aoti_torch_aten_fill__Scalar), skip the call when it would do
// nothing (a tensor already contiguous, already of the dtype), and fill small CPU tensors
// themselves, so that the stable ABI costs nothing measurable at small shapes.

// Uninitialised contiguous tensor on the device of `like` (torch's empty_strided, one shim call).
inline Tensor empty(const Sizes& sizes, ScalarType dtype, const Tensor& like) {
  Sizes strides(sizes.size());
  int64_t stride = 1;
  for (size_t d = sizes.size(); d-- > 0;) {
    strides[d] = stride;
    stride *= std::max<int64_t>(sizes[d], 1);
  }
  int32_t device_type = 0, device_index = 0;
  PPK_SHIM_CHECK(aoti_torch_get_device_type(like.get(), &device_type));
  PPK_SHIM_CHECK(aoti_torch_get_device_index(like.get(), &device_index));
  const int32_t code = torch::stable::detail::to<int32_t>(torch::stable::detail::from(dtype));
  AtenTensorHandle out = nullptr;
  PPK_SHIM_CHECK(aoti_torch_empty_strided(static_cast<int64_t>(sizes.size()), sizes.data(),
                                          strides.data(), code, device_type, device_index, &out));
  return Tensor(out);
}
// Uninitialised contiguous tensor of the shape, dtype and device of `t`.
inline Tensor empty_as(const Tensor& t) { return empty(sizes_of(t), t.scalar_type(), t); }

// Zeros: small CPU tensors by memset (no dispatch), others by torch's zero_ (parallel, any device).
inline Tensor zeros(const Sizes& sizes, ScalarType dtype, const Tensor& like) {
  Tensor out = empty(sizes, dtype, like);
  const size_t bytes = static_cast<size_t>(out.numel()) * out.element_size();
  if (out.is_cpu() && bytes <= (size_t(1) << 20)) {
    if (bytes) std::memset(out.mutable_data_ptr(), 0, bytes);
  } else {
    torch::stable::zero_(out);
  }
  return out;
}

// t itself when already contiguous (torch::stable::contiguous dispatches even then).
inline Tensor as_contiguous(const Tensor& t) {
  return t.is_contiguous() ? t : torch::stable::contiguous(t);
}
// t in dtype (no copy when it already is).
inline Tensor to_dtype(const Tensor& t, ScalarType dtype) {
  return t.scalar_type() == dtype ? t : torch::stable::to(t, dtype);
}

// The small outputs and inputs of the CPU kernels (losses, metrics, per-row statistics), read
// and written in place instead of through torch's conversions.
// A CPU tensor of `sizes` holding values[i] (given in double) in dtype (float or double).
inline Tensor tensor_from(const double* values, const Sizes& sizes, ScalarType dtype,
                          const Tensor& like) {
  PPK_CHECK(like.is_cpu() && (dtype == kFloat || dtype == kDouble),
            "tensor_from: float32 or float64 CPU tensors only");
  Tensor out = empty(sizes, dtype, like);
  if (dtype == kDouble) {
    std::copy(values, values + out.numel(), out.mutable_data_ptr<double>());
  } else {
    float* p = out.mutable_data_ptr<float>();
    for (int64_t i = 0; i < out.numel(); ++i) p[i] = static_cast<float>(values[i]);
  }
  return out;
}
// A 0-dim CPU tensor holding `value`.
inline Tensor scalar_tensor(double value, ScalarType dtype, const Tensor& like) {
  return tensor_from(&value, {}, dtype, like);
}
// The values of a CPU tensor in double (float and double read in place, other dtypes converted).
inline std::vector<double> doubles_of(const Tensor& t) {
  PPK_CHECK(t.is_cpu(), "doubles_of: CPU tensors only");
  const Tensor c = as_contiguous(t.scalar_type() == kFloat ? t : to_dtype(t, kDouble));
  std::vector<double> out(static_cast<size_t>(c.numel()));
  if (c.scalar_type() == kFloat) {
    std::copy(c.const_data_ptr<float>(), c.const_data_ptr<float>() + c.numel(), out.begin());
  } else {
    std::copy(c.const_data_ptr<double>(), c.const_data_ptr<double>() + c.numel(), out.begin());
  }
  return out;
}
// The value of a one-element CPU tensor, in double (the upstream gradient of a loss).
inline double item_double(const Tensor& t) {
  PPK_CHECK(t.numel() == 1, "a Tensor with ", t.numel(), " elements cannot be converted to Scalar");
  return doubles_of(t)[0];
}

// Accumulation and output dtype of the kernels: float64 for float64 inputs, else float32.
inline ScalarType acc_dtype(ScalarType t) { return t == kDouble ? kDouble : kFloat; }
inline ScalarType acc_dtype(const Tensor& x) { return acc_dtype(x.scalar_type()); }

// A contiguous bool mask from a {0, 1} mask of any dtype (no copy when it already is one);
// .to(bool) is mask != 0.
inline Tensor bool_mask(const Tensor& mask) { return as_contiguous(to_dtype(mask, kBool)); }

// ---------------------------------------------------------------- ATen ops by the dispatcher
// call_op("aten::mm", "", a, b): the op through torch_call_dispatcher (stable since torch 2.10),
// for ops that torch/csrc/stable/ops.h does not wrap; returns the op's first output.
template <typename... Args>
Tensor call_op(const char* name, const char* overload, const Args&... args) {
  std::array<StableIValue, sizeof...(Args)> stack{torch::stable::detail::from(args)...};
  PPK_SHIM_CHECK(
      torch_call_dispatcher(name, overload, stack.data(), TORCH_ABI_VERSION));
  return torch::stable::detail::to<Tensor>(stack[0]);
}
// a @ b, and out = a @ b (out given, of the right shape).
inline Tensor mm(const Tensor& a, const Tensor& b) { return call_op("aten::mm", "", a, b); }
inline void mm_out(Tensor& out, const Tensor& a, const Tensor& b) {
  (void)call_op("aten::mm", "out", a, b, out);
}
// The transpose of a 2-d tensor (a view).
inline Tensor t(const Tensor& x) { return torch::stable::transpose(x, 0, 1); }

}  // namespace ppokernels
