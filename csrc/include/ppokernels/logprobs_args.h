// Host-side setup of the logprobs family (token_logprobs and its backward passes), written once
// for the CPU (cpu/logprobs.cpp) and CUDA (cuda/logprobs.cu) front ends: argument checks, row
// layouts (strided slices need no copy), contiguity and output allocation. Those files keep only
// the dtype dispatch, the launch and the registration.
#pragma once
#include <cmath>
#include <optional>

#include "ppokernels/aten_utils.h"
#include "ppokernels/logprobs.h"

namespace ppokernels {

inline void logprobs_check(const char* op, const at::Tensor& logits, const at::Tensor& labels,
                           double temperature) {
  TORCH_CHECK(logits.dim() >= 1, op, ": logits must have at least 1 dimension (..., V)");
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), op,
              ": logits must be float32, float64, bfloat16 or float16, got ",
              logits.scalar_type());
  TORCH_CHECK(labels.scalar_type() == at::kLong, op, ": labels must be int64, got ",
              labels.scalar_type());
  TORCH_CHECK(labels.sizes() == logits.sizes().slice(0, logits.dim() - 1), op,
              ": labels has shape ", labels.sizes(), " but logits has shape ", logits.sizes(),
              " (expected labels.shape == logits.shape[:-1])");
  TORCH_CHECK(labels.device() == logits.device(), op, ": labels and logits on different devices");
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature), op,
              ": temperature must be finite and > 0, got ", temperature);
  TORCH_CHECK(logits.size(-1) > 0 || labels.numel() == 0, op, ": logits has an empty vocabulary");
}

// A tensor whose rows the kernels can address (last dim contiguous, leading dims in <= 2
// strided dims), and that layout. Copies only when the strides do not allow it.
inline at::Tensor rows_of(const at::Tensor& t, RowLayout* layout) {
  const int nd = static_cast<int>(t.dim()) - 1;
  if (t.stride(-1) == 1 && make_row_layout(t.sizes().data(), t.strides().data(), nd, layout)) {
    return t;
  }
  auto c = t.contiguous();
  make_row_layout(c.sizes().data(), c.strides().data(), nd, layout);
  return c;
}

struct LogprobsForwardArgs {
  at::Tensor x, lab;          // logits rows (strided as `layout`), contiguous labels
  RowLayout layout;
  at::Tensor lp, ent, lse;    // [...] fp32 (fp64 for fp64 logits); ent is [0] without entropy
  int64_t n, V;               // rows, vocabulary
};

inline LogprobsForwardArgs logprobs_forward_args(const at::Tensor& logits, const at::Tensor& labels,
                                                 double temperature, bool with_entropy) {
  logprobs_check("token_logprobs", logits, labels, temperature);
  LogprobsForwardArgs a;
  a.x = rows_of(logits, &a.layout);
  a.lab = labels.contiguous();
  a.n = a.lab.numel();
  a.V = logits.size(-1);
  const auto opts = logits.options().dtype(acc_dtype(logits));
  a.lp = at::empty(labels.sizes(), opts);
  a.ent = with_entropy ? at::empty(labels.sizes(), opts) : at::empty({0}, opts);
  a.lse = at::empty(labels.sizes(), opts);
  return a;
}

// The backward writes dz into `dst`: `out` itself when its rows are addressable, else a scratch
// tensor that logprobs_backward_finish copies into `out` (out may be the logits: in place).
struct LogprobsBackwardArgs {
  at::Tensor x, dst, lab;
  RowLayout in_layout, out_layout;
  at::Tensor g_lp, g_ent, ent, lse;  // accumulation dtype; g_ent / ent undefined without entropy
  bool has_ent;
  int64_t n, V;
};

inline LogprobsBackwardArgs logprobs_backward_args(
    const at::Tensor& grad_logprobs, const std::optional<at::Tensor>& grad_entropy,
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
    const std::optional<at::Tensor>& entropy, double temperature, const at::Tensor& out) {
  const char* op = "token_logprobs_backward";
  logprobs_check(op, logits, labels, temperature);
  TORCH_CHECK(out.sizes() == logits.sizes() && out.scalar_type() == logits.scalar_type(), op,
              ": bad output buffer");
  LogprobsBackwardArgs a;
  a.has_ent = grad_entropy.has_value() && grad_entropy->defined();
  TORCH_CHECK(!a.has_ent || (entropy.has_value() && entropy->numel() == labels.numel()), op,
              ": grad_entropy needs the entropy of the forward");
  a.x = rows_of(logits, &a.in_layout);
  const bool direct = out.stride(-1) == 1 &&
                      make_row_layout(out.sizes().data(), out.strides().data(),
                                      static_cast<int>(out.dim()) - 1, &a.out_layout);
  a.dst = direct ? out : at::empty(logits.sizes(), logits.options());
  if (!direct) {
    make_row_layout(a.dst.sizes().data(), a.dst.strides().data(), a.dst.dim() - 1, &a.out_layout);
  }
  const auto acc = acc_dtype(logits);
  a.lab = labels.contiguous();
  a.g_lp = grad_logprobs.to(acc).contiguous();
  if (a.has_ent) {
    a.g_ent = grad_entropy->to(acc).contiguous();
    a.ent = entropy->to(acc).contiguous();
  }
  a.lse = lse.to(acc).contiguous();
  a.n = a.lab.numel();
  a.V = logits.size(-1);
  return a;
}

// The two registered backward ops of a front end, from its `Run(args, inv_temperature,
// ignore_index)` that writes dz into args.dst: token_logprobs_backward (a fresh output) and
// token_logprobs_backward_ (in place: the gradient overwrites the logits, which are destroyed).
using LogprobsBackwardRun = void (*)(const LogprobsBackwardArgs&, double, int64_t);

template <LogprobsBackwardRun Run>
void logprobs_backward_into(const at::Tensor& grad_logprobs,
                            const std::optional<at::Tensor>& grad_entropy,
                            const at::Tensor& logits, const at::Tensor& labels,
                            const at::Tensor& lse, const std::optional<at::Tensor>& entropy,
                            double temperature, int64_t ignore_index, const at::Tensor& out) {
  const LogprobsBackwardArgs a = logprobs_backward_args(grad_logprobs, grad_entropy, logits, labels,
                                                        lse, entropy, temperature, out);
  Run(a, 1.0 / temperature, ignore_index);
  if (!a.dst.is_same(out)) out.copy_(a.dst);
}

template <LogprobsBackwardRun Run>
at::Tensor token_logprobs_backward_op(const at::Tensor& grad_logprobs,
                                      const std::optional<at::Tensor>& grad_entropy,
                                      const at::Tensor& logits, const at::Tensor& labels,
                                      const at::Tensor& lse,
                                      const std::optional<at::Tensor>& entropy,
                                      double temperature, int64_t ignore_index) {
  at::Tensor out = at::empty_like(logits);
  logprobs_backward_into<Run>(grad_logprobs, grad_entropy, logits, labels, lse, entropy,
                              temperature, ignore_index, out);
  return out;
}

template <LogprobsBackwardRun Run>
void token_logprobs_backward_inplace_op(const at::Tensor& grad_logprobs,
                                        const std::optional<at::Tensor>& grad_entropy,
                                        at::Tensor& logits, const at::Tensor& labels,
                                        const at::Tensor& lse,
                                        const std::optional<at::Tensor>& entropy,
                                        double temperature, int64_t ignore_index) {
  logprobs_backward_into<Run>(grad_logprobs, grad_entropy, logits, labels, lse, entropy,
                              temperature, ignore_index, logits);
}

}  // namespace ppokernels
