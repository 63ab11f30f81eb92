// Every schema of the ppokernels namespace, on one screen.
//
// Kernels register themselves per device in csrc/cpu/<stem>.cpp and csrc/cuda/<stem>.cu;
// fake (meta) kernels and autograd formulas are registered in Python (ppokernels/ops/<stem>.py).
// Triton variants are separate ops (ppokernels::<op>_triton) defined by torch.library.triton_op.
#include <Python.h>
#include <torch/library.h>

// `import ppokernels._C` must find a Python module; the ops themselves register through the
// static TORCH_LIBRARY initialisers below when the shared object is loaded.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(ppokernels, m) {
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

  // --- logprobs: per-token log-probs and entropy from logits

  // --- linear_logprobs: per-token log-probs and entropy from hidden states and lm_head weight

  // --- ppo_loss: clipped surrogate policy loss and clipped value loss
}
