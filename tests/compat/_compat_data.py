"""Inputs and tolerances shared by the compat parity tests (tests/compat/test_*.py)."""

import pytest
import torch

TOL = dict(atol=2e-5, rtol=2e-5)


def mask(B=6, T=13, seed=0):
    """Right padding of random length plus interior holes (tool/observation spans); one row
    fully valid, one row with a single valid token."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, T + 1, (B,), generator=g)
    lengths[0], lengths[1] = T, 1
    m = (torch.arange(T)[None] < lengths[:, None]).float()
    holes = torch.rand(B, T, generator=g) < 0.25
    holes[:, 0] = False
    holes[1] = False
    return m * (~holes)


def data(B=6, T=13, seed=0, scale=1.0):
    """Three random [B, T] tensors and a mask."""
    g = torch.Generator().manual_seed(seed)
    r = lambda: torch.randn(B, T, generator=g) * scale  # noqa: E731
    return r(), r(), r(), mask(B, T, seed)


def close(a, b, **kw):
    torch.testing.assert_close(a, b, **(kw or TOL))


def error(fn):
    """``(type, message)`` of the exception ``fn()`` raises (a test fails if it raises none):
    what a drop-in raises is compared with what its trainer raises."""
    with pytest.raises(Exception) as e:
        fn()
    return type(e.value), str(e.value)
