"""Argument checks shared by the public op functions.

Every message starts with the op name and names the argument, so a bad call fails with a clear
Python exception (TypeError for wrong kinds/dtypes, ValueError for wrong shapes/values) before any
kernel runs.
"""

from __future__ import annotations

import math

import torch

from ppokernels.losses import AGG_MODES, KL_ESTIMATORS

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def tensor(
    op: str, name: str, x, *, floating: bool = True, ndim: int | tuple[int, ...] | None = None
):
    """``x`` is a tensor (floating point unless ``floating=False``) with ``ndim`` dimensions."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if floating and x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{op}: {name} must be float32, float64, bfloat16 or float16, got {x.dtype}"
        )
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if x.dim() not in allowed:
            want = " or ".join(str(d) for d in allowed)
            raise ValueError(
                f"{op}: {name} must have {want} dimensions, got shape {tuple(x.shape)}"
            )
    return x


def pair(op: str, name: str, x, other_name: str, other, *, ndim: int | None = None) -> None:
    """The two float inputs of an elementwise op: tensors (``ndim`` dimensions when given) of
    one shape, device and dtype, not on meta. One pass of attribute reads when they are fine
    (every microsecond shows at 4 x 64 tokens); else the single checks, in the order of their
    messages."""
    if (
        isinstance(x, torch.Tensor)
        and isinstance(other, torch.Tensor)
        and x.dtype in FLOAT_DTYPES
        and x.dtype == other.dtype
        and x.shape == other.shape
        and (ndim is None or x.dim() == ndim)
        and x.device == other.device
        and not x.is_meta
    ):
        return
    tensor(op, name, x, ndim=ndim)
    tensor(op, other_name, other, ndim=ndim)
    same_shape(op, other_name, other, name, x)
    same_device(op, other_name, other, x)
    same_dtype(op, other_name, other, name, x)
    not_meta(op, name, x)


def mask(op: str, name: str, m, like: torch.Tensor) -> torch.Tensor:
    """A {0, 1} mask of ``like``'s shape and device (bool, integer or floating)."""
    if not isinstance(m, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(m).__name__}")
    if m.dtype.is_complex:
        raise TypeError(f"{op}: {name} must be bool, integer or floating, got {m.dtype}")
    same_shape(op, name, m, "the data", like)
    same_device(op, name, m, like)
    # A mask selects, it does not weigh: refuse 0.5, 2, -1 or NaN rather than binarise them
    # silently (one pass over the mask, one sync on CUDA; skipped under torch.compile)
    if m.dtype != torch.bool and m.device.type != "meta" and not torch.compiler.is_compiling():
        if bool(((m != 0) & (m != 1)).any()):
            bad = m[(m != 0) & (m != 1)][0].item()
            raise ValueError(
                f"{op}: {name} must hold only 0 and 1 (a selection, not weights), got {bad}"
            )
    return m


def labels(op: str, name: str, y) -> torch.Tensor:
    """An int64 or int32 tensor of token ids."""
    if not isinstance(y, torch.Tensor) or y.dtype not in (torch.int64, torch.int32):
        got = getattr(y, "dtype", type(y).__name__)
        raise TypeError(f"{op}: {name} must be int64 or int32, got {got}")
    return y


def like(op: str, name: str, x: torch.Tensor, other_name: str, other: torch.Tensor) -> None:
    """``x`` has the shape and the device of ``other``."""
    same_shape(op, name, x, other_name, other)
    same_device(op, name, x, other)


def not_meta(op: str, name: str, x: torch.Tensor) -> None:
    """Meta tensors are refused by every public op: their checks read the data (label ranges,
    masks, group ids). For shapes without data use torch.compile or FakeTensorMode, which the
    ops support (their fake kernels propagate shapes)."""
    if x.is_meta:
        raise ValueError(
            f"{op}: {name} is on the meta device; meta tensors are not supported: pass cpu or "
            "cuda tensors, or trace under torch.compile / FakeTensorMode for shapes alone"
        )


def constant(op: str, name: str, x) -> None:
    """``x`` (rollout data) gets no gradient from the fused kernels: refuse one that wants it."""
    if x is not None and x.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            f"{op}: {name} requires grad, but the fused kernels treat it as a constant "
            f"(rollout data); pass {name}.detach() or use backend='reference'"
        )


def data2d(op: str, name: str, x, other_name: str | None = None, other=None) -> torch.Tensor:
    """A float [B, T] tensor of a loss (shape and device of ``other`` when given), not on meta."""
    tensor(op, name, x, ndim=2)
    not_meta(op, name, x)
    if other is not None:
        like(op, name, x, other_name, other)
    return x


def agg(op: str, mode, num_tokens, num_seqs) -> tuple[float | None, float | None]:
    """A loss aggregation (``AGG_MODES``) and its optional global counts, both > 0 when given."""
    choice(op, "agg", mode, AGG_MODES)
    num_tokens = positive(op, "num_tokens", num_tokens, allow_none=True)
    num_seqs = positive(op, "num_seqs", num_seqs, allow_none=True)
    return num_tokens, num_seqs


def row_or_token(op: str, name: str, x, like: torch.Tensor) -> torch.Tensor:
    """A float tensor of shape [B, T] or [B] on ``like``'s device (any float dtype)."""
    tensor(op, name, x, ndim=(1, 2))
    if tuple(x.shape) not in (tuple(like.shape), tuple(like.shape[:1])):
        raise ValueError(
            f"{op}: {name} must have shape [B, T] = {tuple(like.shape)} or [B] = "
            f"({like.shape[0]},), got {tuple(x.shape)}"
        )
    same_device(op, name, x, like)
    return x


def same_shape(op: str, name: str, x: torch.Tensor, other_name: str, other: torch.Tensor) -> None:
    if x.shape != other.shape:
        raise ValueError(
            f"{op}: {name} has shape {tuple(x.shape)} "
            f"but {other_name} has shape {tuple(other.shape)}"
        )


def same_device(op: str, name: str, x: torch.Tensor, other: torch.Tensor) -> None:
    if x.device != other.device:
        raise ValueError(
            f"{op}: {name} is on {x.device} but the other inputs are on {other.device}"
        )


def same_dtype(op: str, name: str, x: torch.Tensor, other_name: str, other: torch.Tensor) -> None:
    if x.dtype != other.dtype:
        raise TypeError(f"{op}: {name} is {x.dtype} but {other_name} is {other.dtype}")


def unit_interval(op: str, name: str, v) -> float:
    """A Python number in [0, 1] (discount factors)."""
    v = number(op, name, v)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{op}: {name} must be in [0, 1], got {v}")
    return v


def positive(op: str, name: str, v, *, allow_none: bool = False):
    if v is None and allow_none:
        return None
    v = number(op, name, v)
    if not v > 0.0:
        raise ValueError(f"{op}: {name} must be > 0, got {v}")
    return v


def number(op: str, name: str, v) -> float:
    if isinstance(v, torch.Tensor) or isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{op}: {name} must be a Python float, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"{op}: {name} must be finite, got {v}")
    return v


def choice(op: str, name: str, v, allowed) -> str:
    if v not in allowed:
        raise ValueError(f"{op}: {name} must be one of {tuple(allowed)}, got {v!r}")
    return v


def kl_estimator(op: str, name: str, v) -> str:
    """One of KL_ESTIMATORS, optionally with a trailing "+" (k2's straight-through gradient)."""
    if not isinstance(v, str) or v.rstrip("+") not in KL_ESTIMATORS or v.count("+") > 1:
        raise ValueError(
            f"{op}: {name} must be one of {KL_ESTIMATORS} (optionally with '+'), got {v!r}"
        )
    return v


def non_negative(op: str, name: str, v) -> float:
    """A finite Python number >= 0 (epsilons)."""
    v = number(op, name, v)
    if v < 0.0:
        raise ValueError(f"{op}: {name} must be >= 0, got {v}")
    return v


def integer(op: str, name: str, v) -> int:
    """A Python int (not a bool): ``ignore_index``."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{op}: {name} must be an int, got {type(v).__name__}")
    return v


def flag(op: str, name: str, v) -> bool:
    """A Python bool (keyword switches such as ``unbiased``)."""
    if not isinstance(v, bool):
        raise TypeError(f"{op}: {name} must be a bool, got {type(v).__name__}")
    return v


def head_options(op: str, temperature, ignore_index, with_entropy, chunk_size) -> float:
    """The scalar options of the linear heads (linear_logprobs, linear_ppo_policy_loss); returns
    the temperature as a float."""
    temperature = positive(op, "temperature", temperature)
    integer(op, "ignore_index", ignore_index)
    flag(op, "with_entropy", with_entropy)
    if chunk_size is not None:
        integer(op, "chunk_size", chunk_size)
        if chunk_size <= 0:
            raise ValueError(f"{op}: chunk_size must be a positive int or None, got {chunk_size}")
    return temperature
