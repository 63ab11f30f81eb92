// Every schema of the ppokernels namespace, on one screen, registered through the LibTorch stable
// ABI (so this binary loads on every torch from the oldest supported, 2.11, on).
//
// Kernels register themselves per device in csrc/cpu/<stem>.cpp and csrc/cuda/<stem>.cu;
// fake (meta) kernels and autograd formulas are registered in Python (ppokernels/ops/<stem>.py).
// Triton variants are separate ops (ppokernels::<op>_triton) defined by torch.library.triton_op.
#include <Python.h>
#include <torch/csrc/stable/library.h>

#include "ppokernels/cpu_isa.h"

// `import ppokernels._C` must find a Python module; the ops themselves register through the
// static STABLE_TORCH_LIBRARY initialisers below when the shared object is loaded. The module's two
// functions say which ISA level of the CPU kernels was chosen at load (csrc/cpu_isa.cpp).
namespace {
PyObject* py_cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(ppokernels::cpu_isa_name(ppokernels::cpu_isa()));
}
PyObject* py_cpu_isa_supported(PyObject*, PyObject*) {
  return PyUnicode_FromString(ppokernels::cpu_isa_name(ppokernels::cpu_isa_supported()));
}
PyMethodDef methods[] = {
    {"cpu_isa", py_cpu_isa, METH_NOARGS,
     "ISA level of the CPU kernels in use: 'scalar', 'avx2' or 'avx512'."},
    {"cpu_isa_supported", py_cpu_isa_supported, METH_NOARGS,
     "Best ISA level of the CPU kernels that this CPU supports and this build has."},
    {nullptr, nullptr, 0, nullptr}};
}  // namespace

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}

STABLE_TORCH_LIBRARY(ppokernels, m) {
  // --- kl: per-token KL estimators (k1, k2, k3, abs; "+" = straight-through k2 gradient)
  m.def("kl_penalty(Tensor logprobs, Tensor ref_logprobs, str estimator, float? clamp) -> Tensor");
  m.def(
      "kl_penalty_backward(Tensor grad, Tensor logprobs, Tensor ref_logprobs, str estimator, "
      "float? clamp) -> Tensor");

  // --- gae: generalised advantage estimation and discounted returns (reverse linear scans)
  m.def(
      "gae(Tensor rewards, Tensor values, Tensor mask, float gamma, float lam, str mode) "
      "-> (Tensor advantages, Tensor returns)");
  m.def(
      "gae_backward(Tensor grad_advantages, Tensor grad_returns, Tensor mask, float gamma, "
      "float lam, str mode, ScalarType dtype) -> (Tensor grad_rewards, Tensor grad_values)");
  m.def("discounted_returns(Tensor rewards, Tensor mask, float gamma, str mode) -> Tensor");
  m.def(
      "discounted_returns_backward(Tensor grad_returns, Tensor mask, float gamma, str mode, "
      "ScalarType dtype) -> Tensor");

  // --- advantages: masked moments, whitening, group baselines (GRPO, RLOO, Dr.GRPO)
  // masked_moments -> [mean, var, count] over the entries where mask != 0 (fp32; fp64 for fp64)
  m.def("masked_moments(Tensor x, Tensor mask, bool unbiased) -> Tensor");
  m.def(
      "masked_moments_backward(Tensor grad, Tensor x, Tensor mask, Tensor moments, bool unbiased) "
      "-> Tensor");
  m.def("masked_whiten(Tensor x, Tensor mask, bool shift_mean, bool unbiased, float eps) -> Tensor");
  m.def(
      "masked_whiten_backward(Tensor grad, Tensor x, Tensor mask, bool shift_mean, bool unbiased, "
      "float eps) -> Tensor");
  // group_ids: dense int64 ids in [0, num_groups)
  m.def(
      "group_advantages(Tensor scores, Tensor group_ids, int num_groups, str estimator, float eps, "
      "bool norm_by_std) -> Tensor");
  m.def(
      "group_advantages_backward(Tensor grad, Tensor scores, Tensor group_ids, int num_groups, "
      "str estimator, float eps, bool norm_by_std) -> Tensor");

  // --- logprobs: per-token log-probs and entropy from logits
  // lse (log-sum-exp of logits / temperature per token) is saved for the backward; entropy is
  // empty (shape [0]) unless with_entropy. inplace_backward only tells the autograd formula to
  // use token_logprobs_backward_ (which overwrites the logits with their gradient).
  m.def(
      "token_logprobs(Tensor logits, Tensor labels, float temperature, bool with_entropy, "
      "int ignore_index, bool inplace_backward) -> (Tensor logprobs, Tensor entropy, Tensor lse)");
  m.def(
      "token_logprobs_backward(Tensor grad_logprobs, Tensor? grad_entropy, Tensor logits, "
      "Tensor labels, Tensor lse, Tensor? entropy, float temperature, int ignore_index) -> Tensor");
  m.def(
      "token_logprobs_backward_(Tensor grad_logprobs, Tensor? grad_entropy, Tensor(a!) logits, "
      "Tensor labels, Tensor lse, Tensor? entropy, float temperature, int ignore_index) -> ()");

  // --- linear_logprobs: per-token log-probs and entropy from hidden states and lm_head weight
  // label_logit, lse and entropy of z = (hidden @ weight.T + bias) / temperature per row over the
  // local vocabulary shard [vocab_start, vocab_start + V); rows labelled ignore_index give zeros.
  // logits_cache: at most cache_bytes of the forward's logits (1-D, accumulation dtype, in the
  // backend's own tile layout; [0] when cache_bytes is 0), saved for the backward, which reads
  // those logits instead of recomputing their GEMM (an empty tensor: recompute all).
  m.def(
      "linear_logprobs(Tensor hidden, Tensor weight, Tensor labels, Tensor? bias, "
      "float temperature, int ignore_index, int vocab_start, int chunk_size, int cache_bytes) "
      "-> (Tensor label_logit, Tensor lse, Tensor entropy, Tensor logits_cache)");
  m.def(
      "linear_logprobs_backward(Tensor grad_label_logit, Tensor grad_lse, Tensor grad_entropy, "
      "Tensor hidden, Tensor weight, Tensor labels, Tensor? bias, Tensor lse, Tensor entropy, "
      "Tensor logits_cache, float temperature, int ignore_index, int vocab_start, "
      "int chunk_size, bool[3] output_mask) "
      "-> (Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");

  // --- ppo_loss: the policy loss of every loss spec, and the clipped value loss
  // loss_mode / loss_params: a loss spec of ppokernels/losses.py (its mode and its PARAMS, e.g.
  // "vanilla", [clip_low, clip_high, dual_clip or inf]). Fused forward: (loss, metrics [clipfrac,
  // approx_kl, dual_clipfrac, kl, entropy], row_stats [B, 4] = per row the aggregation weight,
  // ra, the surrogate's weight and rb of ppo_policy_loss.h, saved for the backward).
  m.def(
      "ppo_policy_loss(Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor mask, "
      "Tensor? ref_logprobs, Tensor? entropy, Tensor? is_weights, str loss_mode, "
      "float[] loss_params, float? logratio_clamp, str agg, float? num_tokens, float? num_seqs, "
      "float kl_coef, str kl_estimator, float? kl_clamp, float entropy_coef) "
      "-> (Tensor loss, Tensor metrics, Tensor row_stats)");
  m.def(
      "ppo_policy_loss_backward(Tensor grad, Tensor logprobs, Tensor old_logprobs, "
      "Tensor advantages, Tensor mask, Tensor? ref_logprobs, Tensor? entropy, Tensor? is_weights, "
      "Tensor row_stats, str loss_mode, float[] loss_params, float? logratio_clamp, "
      "float kl_coef, str kl_estimator, float? kl_clamp, float entropy_coef) "
      "-> (Tensor grad_logprobs, Tensor grad_ref_logprobs, Tensor grad_entropy)");
  // --- linear_ppo_policy_loss: the lm_head, the log-probs and ppo_policy_loss in one chunked
  // pass that makes the gradients of hidden, weight and bias during the forward (3 GEMMs). Its
  // implementation is Python over the kernels above (ppokernels/ops/_linear_ppo_policy_loss_head.py,
  // registered for CPU and CUDA there); *_backend ("cpp" or "triton") pick the kernels of
  // token_logprobs, ppo_policy_loss and linear_logprobs; output_mask = which of (hidden, weight,
  // bias) get a gradient (the others are empty).
  m.def(
      "linear_ppo_policy_loss(Tensor hidden, Tensor weight, Tensor labels, Tensor old_logprobs, "
      "Tensor advantages, Tensor mask, Tensor? bias, Tensor? ref_logprobs, Tensor? is_weights, "
      "float temperature, bool with_entropy, int chunk_size, str token_backend, str loss_backend, "
      "str linear_backend, str loss_mode, float[] loss_params, float? logratio_clamp, str agg, "
      "float? num_tokens, float? num_seqs, float kl_coef, str kl_estimator, float? kl_clamp, "
      "float entropy_coef, bool[3] output_mask) -> (Tensor loss, Tensor metrics, "
      "Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");

  m.def(
      "value_loss(Tensor values, Tensor old_values, Tensor returns, Tensor mask, float? clip, "
      "str agg, float? num_tokens, float? num_seqs) -> (Tensor loss, Tensor clipfrac, "
      "Tensor row_scale)");
  m.def(
      "value_loss_backward(Tensor grad, Tensor values, Tensor old_values, Tensor returns, "
      "Tensor mask, Tensor row_scale, float? clip) -> Tensor");

  // --- rollout_correction: importance weights between trainer and sampler log-probs (token,
  // sequence = geometric mean, sequence_sum = product; truncate or mask to bounds [L, U]), the
  // rejection mask of the criteria "<agg>_<estimator>" (int codes agg * 5 + estimator, from the
  // table of ppokernels/reference/rollout_correction.py; each with [lower, upper]), and per-row
  // statistics (its ROW_STATS) the metrics come from. A NaN in bounds / criteria_bounds means
  // no bound. Constants: no backward.
  m.def(
      "rollout_correction(Tensor logprobs, Tensor rollout_logprobs, Tensor mask, str level, "
      "str mode, float[] bounds, float? logratio_clamp, int[] criteria, float[] criteria_bounds) "
      "-> (Tensor weights, Tensor keep, Tensor row_stats)");
}
