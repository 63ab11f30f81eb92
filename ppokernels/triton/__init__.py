"""Triton kernels, one module per op family, each registered with ``torch.library.triton_op``.

Importing this package needs triton; :mod:`ppokernels.ops` imports it only when triton is
installed. ``TRITON_INTERPRET=1`` must be set before the import for the kernels to run on CPU
tensors (the interpreter is chosen when ``@triton.jit`` decorates a kernel).
"""

# Every kernel module; each holds an ``AOT`` table (``_common.Spec`` rows) of the configurations
# its launchers can produce, compiled by tests/build/_triton_aot.py and audited by
# tests/build/test_triton_audit.py.
MODULES = (
    "ppokernels.triton.gae",
    "ppokernels.triton.group_advantages",
    "ppokernels.triton.kl_penalty",
    "ppokernels.triton.linear_logprobs",
    "ppokernels.triton.masked_whiten",
    "ppokernels.triton.ppo_policy_loss",
    "ppokernels.triton.rollout_correction",
    "ppokernels.triton.token_logprobs",
    "ppokernels.triton.value_loss",
)
