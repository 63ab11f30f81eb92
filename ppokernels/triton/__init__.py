"""Triton kernels, one module per op family, each registered with ``torch.library.triton_op``.

Importing this package needs triton; :mod:`ppokernels.ops` imports it only when triton is
installed. ``TRITON_INTERPRET=1`` must be set before the import for the kernels to run on CPU
tensors (the interpreter is chosen when ``@triton.jit`` decorates a kernel).
"""
