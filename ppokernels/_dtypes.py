"""Dtype vocabulary shared by the op wrappers, the Triton launchers and the reference.

Written once here so that every backend agrees (the C++ side has the same two helpers in
``csrc/include/ppokernels/aten_utils.h``).
"""

from __future__ import annotations

import torch


def acc_dtype(*xs: torch.Tensor | torch.dtype | None) -> torch.dtype:
    """Accumulation (and output) dtype: float64 if any input is float64, else float32.

    bf16/fp16/fp32 inputs accumulate in fp32 (no bf16 accumulators anywhere); fp64 stays fp64 so
    that ``gradcheck`` sees the exact math. Accepts tensors, dtypes and ``None`` (ignored).
    """
    for x in xs:
        dtype = x.dtype if isinstance(x, torch.Tensor) else x
        if dtype == torch.float64:
            return torch.float64
    return torch.float32


def bool_mask(mask: torch.Tensor) -> torch.Tensor:
    """``mask != 0`` as a bool tensor (bool masks are returned as they are, without a copy)."""
    return mask if mask.dtype == torch.bool else mask != 0


def promote(*xs: torch.Tensor | None) -> list[torch.Tensor | None]:
    """The tensors in their common float dtype (``None`` passes through): e.g. bf16 log-probs with
    fp32 old log-probs run in fp32; the cast is outside the op, so gradients reach the bf16
    tensor in bf16."""
    dtype = None
    for x in xs:
        if x is not None:
            dtype = x.dtype if dtype is None else torch.promote_types(dtype, x.dtype)
    return [x if x is None or x.dtype == dtype else x.to(dtype) for x in xs]
