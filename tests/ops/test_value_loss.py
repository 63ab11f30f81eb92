"""value_loss against the fp64 reference on every backend: clipped and unclipped, every
aggregation, loss, clipfrac and the gradient (NaN padding at masked positions included)."""

import pytest
import torch

import ppokernels
from ppokernels import reference

from .test_ppo_policy_loss import AGGS, PARAMS, _tol, _value_inputs


@pytest.mark.parametrize("device, backend", PARAMS)
@pytest.mark.parametrize("clip", [None, 0.2])
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_value_loss(device, backend, clip, agg, dtype):
    v, vo, ret, mask = _value_inputs(6, 41, dtype, device)
    v.requires_grad_()
    kw = dict(clip=clip, agg=agg, num_tokens=100.0 if agg == "token-sum" else None)
    kw["num_tokens"] = None if agg != "token-mean" else kw["num_tokens"]
    out = ppokernels.value_loss(v, vo, ret, mask, **kw, backend=backend)
    v64 = v.detach().cpu().double().requires_grad_()
    exp = reference.value_loss(v64, vo.cpu().double(), ret.cpu().double(), mask.cpu(), **kw)
    tol = _tol(dtype, backend)
    torch.testing.assert_close(out.loss.detach().cpu().double(), exp.loss, **tol)
    torch.testing.assert_close(out.clipfrac.cpu().double(), exp.clipfrac, **tol)
    if clip is not None:
        assert 0 < exp.clipfrac < 1
    gscale = torch.randn((), dtype=torch.float64)
    (g,) = torch.autograd.grad(out.loss, v, gscale.to(out.loss.dtype))
    (e,) = torch.autograd.grad(exp.loss, v64, gscale)
    assert (g[~mask] == 0).all() and torch.isfinite(g).all()
    torch.testing.assert_close(g.cpu().double(), e, **tol)
