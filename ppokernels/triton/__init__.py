"""Triton kernels, one module per op family, each registered with ``torch.library.triton_op``.

Importing this package needs triton; :mod:`ppokernels.ops` imports it only when triton is
installed. ``TRITON_INTERPRET=1`` must be set before the import for the kernels to run on CPU
tensors (the interpreter is chosen when ``@triton.jit`` decorates a kernel).
"""

# Every kernel module; each holds an ``AOT`` table (``_common.Spec`` rows) of the configurations
# its launchers can produce, compiled by tests/build/_triton_aot.py and audited by
# tests/build/test_triton_audit.py.
MODULES = (
    "ppokernels.triton.advantages",
    "ppokernels.triton.advantages_group",
    "ppokernels.triton.gae",
    "ppokernels.triton.kl",
    "ppokernels.triton.linear_logprobs",
    "ppokernels.triton.logprobs",
    "ppokernels.triton.ppo_loss",
    "ppokernels.triton.ppo_loss_value",
    "ppokernels.triton.rollout_correction",
)
