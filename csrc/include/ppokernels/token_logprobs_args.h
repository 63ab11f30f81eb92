// Host-side setup of the logprobs family (token_logprobs and its backward passes), written once
// for the CPU (cpu/token_logprobs.cpp) and CUDA (cuda/token_logprobs.cu) front ends: argument checks, row
// layouts (strided slices need no copy), contiguity and output allocation. Those files keep only
// the dtype dispatch, the launch and the registration.
#pragma once
#include <cmath>
#include <optional>

#include "ppokernels/stable.h"
#include "ppokernels/token_logprobs.h"

namespace ppokernels {

inline void logprobs_check(const char* op, const Tensor& logits, const Tensor& labels,
                           double temperature) {
  PPK_CHECK(logits.dim() >= 1, op, ": logits must have at least 1 dimension (..., V)");
  PPK_CHECK(is_floating_type(logits.scalar_type()), op,
            ": logits must be float32, float64, bfloat16 or float16, got ",
            dtype_name(logits.scalar_type()));
  PPK_CHECK(labels.scalar_type() == kLong, op, ": labels must be int64, got ",
            dtype_name(labels.scalar_type()));
  PPK_CHECK(labels.sizes().equals(logits.sizes().slice(0, logits.dim() - 1)), op,
            ": labels has shape ", shape_str(labels), " but logits has shape ", shape_str(logits),
            " (expected labels.shape == logits.shape[:-1])");
  PPK_CHECK(same_device(labels, logits), op, ": labels and logits on different devices");
  PPK_CHECK(temperature > 0 && std::isfinite(temperature), op,
            ": temperature must be finite and > 0, got ", temperature);
  PPK_CHECK(logits.size(-1) > 0 || labels.numel() == 0, op, ": logits has an empty vocabulary");
}

// A tensor whose rows the kernels can address (last dim contiguous, leading dims in <= 2
// strided dims), and that layout. Copies only when the strides do not allow it.
inline Tensor rows_of(const Tensor& t, RowLayout* layout) {
  const int nd = static_cast<int>(t.dim()) - 1;
  if (t.stride(-1) == 1 && make_row_layout(t.sizes().data(), t.strides().data(), nd, layout)) {
    return t;
  }
  auto c = as_contiguous(t);
  make_row_layout(c.sizes().data(), c.strides().data(), nd, layout);
  return c;
}

struct LogprobsForwardArgs {
  Tensor x, lab;          // logits rows (strided as `layout`), contiguous labels
  RowLayout layout;
  Tensor lp, ent, lse;    // [...] fp32 (fp64 for fp64 logits); ent is [0] without entropy
  int64_t n, V;               // rows, vocabulary
};

inline LogprobsForwardArgs logprobs_forward_args(const Tensor& logits, const Tensor& labels,
                                                 double temperature, bool with_entropy) {
  logprobs_check("token_logprobs", logits, labels, temperature);
  LogprobsForwardArgs a;
  a.x = rows_of(logits, &a.layout);
  a.lab = as_contiguous(labels);
  a.n = a.lab.numel();
  a.V = logits.size(-1);
  const ScalarType acc = acc_dtype(logits);
  a.lp = empty(sizes_of(labels), acc, logits);
  a.ent = with_entropy ? empty(sizes_of(labels), acc, logits) : empty({0}, acc, logits);
  a.lse = empty(sizes_of(labels), acc, logits);
  return a;
}

// The backward writes dz into `dst`: `out` itself when its rows are addressable, else a scratch
// tensor that logprobs_backward_into copies into `out` (out may be the logits: in place).
struct LogprobsBackwardArgs {
  Tensor x, dst, lab;
  RowLayout in_layout, out_layout;
  Tensor g_lp, g_ent, ent, lse;  // accumulation dtype; g_ent / ent undefined without entropy
  bool direct;                   // dst is `out` itself (no copy back)
  bool has_ent;
  int64_t n, V;
};

inline LogprobsBackwardArgs logprobs_backward_args(
    const Tensor& grad_logprobs, const std::optional<Tensor>& grad_entropy,
    const Tensor& logits, const Tensor& labels, const Tensor& lse,
    const std::optional<Tensor>& entropy, double temperature, const Tensor& out) {
  const char* op = "token_logprobs_backward";
  logprobs_check(op, logits, labels, temperature);
  PPK_CHECK(same_shape(out, logits) && out.scalar_type() == logits.scalar_type(), op,
            ": bad output buffer");
  LogprobsBackwardArgs a;
  a.has_ent = grad_entropy.has_value() && grad_entropy->defined();
  PPK_CHECK(!a.has_ent || (entropy.has_value() && entropy->numel() == labels.numel()), op,
            ": grad_entropy needs the entropy of the forward");
  a.x = rows_of(logits, &a.in_layout);
  a.direct = out.stride(-1) == 1 &&
             make_row_layout(out.sizes().data(), out.strides().data(),
                             static_cast<int>(out.dim()) - 1, &a.out_layout);
  a.dst = a.direct ? out : empty(sizes_of(logits), logits.scalar_type(), logits);
  if (!a.direct) {
    make_row_layout(a.dst.sizes().data(), a.dst.strides().data(), a.dst.dim() - 1, &a.out_layout);
  }
  const ScalarType acc = acc_dtype(logits);
  a.lab = as_contiguous(labels);
  a.g_lp = as_contiguous(to_dtype(grad_logprobs, acc));
  if (a.has_ent) {
    a.g_ent = as_contiguous(to_dtype(*grad_entropy, acc));
    a.ent = as_contiguous(to_dtype(*entropy, acc));
  }
  a.lse = as_contiguous(to_dtype(lse, acc));
  a.n = a.lab.numel();
  a.V = logits.size(-1);
  return a;
}

// The two registered backward ops of a front end, from its `Run(args, inv_temperature,
// ignore_index)` that writes dz into args.dst: token_logprobs_backward (a fresh output) and
// token_logprobs_backward_ (in place: the gradient overwrites the logits, which are destroyed).
using LogprobsBackwardRun = void (*)(const LogprobsBackwardArgs&, double, int64_t);

template <LogprobsBackwardRun Run>
void logprobs_backward_into(const Tensor& grad_logprobs,
                            const std::optional<Tensor>& grad_entropy,
                            const Tensor& logits, const Tensor& labels,
                            const Tensor& lse, const std::optional<Tensor>& entropy,
                            double temperature, int64_t ignore_index, const Tensor& out) {
  const LogprobsBackwardArgs a = logprobs_backward_args(grad_logprobs, grad_entropy, logits, labels,
                                                        lse, entropy, temperature, out);
  Run(a, 1.0 / temperature, ignore_index);
  if (!a.direct) {
    Tensor o = out;  // a handle on the same tensor (copy_ takes a non-const one)
    torch::stable::copy_(o, a.dst);
  }
}

template <LogprobsBackwardRun Run>
Tensor token_logprobs_backward_op(const Tensor& grad_logprobs,
                                  const std::optional<Tensor>& grad_entropy,
                                  const Tensor& logits, const Tensor& labels,
                                  const Tensor& lse,
                                  const std::optional<Tensor>& entropy,
                                  double temperature, int64_t ignore_index) {
  Tensor out = empty_as(logits);
  logprobs_backward_into<Run>(grad_logprobs, grad_entropy, logits, labels, lse, entropy,
                              temperature, ignore_index, out);
  return out;
}

template <LogprobsBackwardRun Run>
void token_logprobs_backward_inplace_op(const Tensor& grad_logprobs,
                                        const std::optional<Tensor>& grad_entropy,
                                        Tensor& logits, const Tensor& labels,
                                        const Tensor& lse,
                                        const std::optional<Tensor>& entropy,
                                        double temperature, int64_t ignore_index) {
  logprobs_backward_into<Run>(grad_logprobs, grad_entropy, logits, labels, lse, entropy,
                              temperature, ignore_index, logits);
}

}  // namespace ppokernels
