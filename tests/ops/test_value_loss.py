"""value_loss: the conformance blocks from ``ppokernels.testing`` (clipped and unclipped, every
aggregation, NaN padding at masked positions, all-masked rows and batches, bad input), then what
is special to it: the rollout data (old values, returns) refused when it requires grad."""

import pytest
import torch

import ppokernels
from ppokernels import reference
from ppokernels.testing import OpSpec, Sample, conformance_tests

from .test_ppo_policy_loss import AGGS, _mask, _tol


def _value_inputs(B, T, dtype, device, garbage=True):
    v = torch.randn(B, T, dtype=torch.float64)
    vo = v + 0.4 * torch.randn(B, T, dtype=torch.float64)
    ret = torch.randn(B, T, dtype=torch.float64)
    mask = _mask(B, T, "cpu")
    if garbage:  # padding holds anything; it must not leak into the loss or the gradient
        v = v.masked_fill(~mask, float("nan"))
    t = lambda x: x.to(device=device, dtype=dtype)  # noqa: E731
    return t(v), t(vo), t(ret), mask.to(device)


def samples(device, dtype):
    out = []
    for clip in [None, 0.2]:
        for agg in AGGS:
            kw = dict(clip=clip, agg=agg)
            out.append(Sample(_value_inputs(6, 41, dtype, device), kw, f"clip{clip}-{agg}"))
    kw = dict(clip=0.2, agg="token-mean", num_tokens=100.0)
    out.append(Sample(_value_inputs(6, 41, dtype, device), kw, "num_tokens"))
    v, vo, ret, mask = _value_inputs(3, 6, dtype, device, garbage=False)
    out.append(Sample((v, vo, ret, mask), dict(clip=0.3), "small-clip0.3"))
    z = torch.zeros(3, 0, dtype=dtype, device=device)
    out.append(Sample((z, z, z, z.bool()), dict(clip=0.2), "empty-horizon"))
    return out


def masked_samples(device, dtype):
    v, vo, ret, mask = _value_inputs(3, 9, dtype, device, garbage=False)
    return [Sample((v, vo, ret, mask), dict(clip=0.2, agg=agg), f"rows-{agg}") for agg in AGGS] + [
        Sample((v, vo, ret, torch.zeros_like(mask)), dict(clip=0.2, agg=agg), f"all-{agg}")
        for agg in AGGS
    ]


def _bad_inputs():
    lp, old, adv, mask = _value_inputs(3, 5, torch.float32, "cpu", garbage=False)
    v = ppokernels.value_loss
    meta = [t.to("meta") for t in (lp, old, adv, mask)]
    return [
        (lambda: v(lp, old[:2], adv, mask), ValueError, "value_loss: old_values has shape"),
        (lambda: v(lp, old, adv[:, :2], mask), ValueError, "value_loss: returns has shape"),
        (lambda: v(lp, old, adv, mask, clip=0.0), ValueError, "value_loss: clip must be > 0"),
        (lambda: v(lp, old, adv, mask, agg="sum"), ValueError, "value_loss: agg must be one of"),
        (
            lambda: v(lp, old, adv, mask.to(torch.complex64)),
            TypeError,
            "value_loss: mask must be bool",
        ),
        (lambda: v(*meta), ValueError, "value_loss: values is on the meta device"),
        (lambda: v(lp, old, adv, mask, backend="fast"), ValueError, "value_loss: backend"),
    ]


def _opcheck(s):
    v, vo, ret, mask = s.args
    kw = dict(clip=None, agg="token-mean", num_tokens=None, num_seqs=None) | s.kwargs
    args = (v.nan_to_num(0.0).requires_grad_(), vo, ret, mask, kw["clip"], kw["agg"])
    return [(torch.ops.ppokernels.value_loss.default, (*args, kw["num_tokens"], kw["num_seqs"]))]


SPEC = OpSpec(
    name="value_loss",
    fn=ppokernels.value_loss,
    reference=reference.value_loss,
    samples=samples,
    differentiable=(0,),
    outputs=lambda r: (r.loss, r.clipfrac),
    masked_sample=masked_samples,
    mask_arg=3,
    bad_inputs=_bad_inputs(),
    opcheck=_opcheck,
    tolerances=_tol,
    gradcheck_samples=["small-clip0.3"],
    opcheck_samples=["clipNone-token-mean", "clip0.2-seq-mean-token-sum-norm"],
)
globals().update(conformance_tests(SPEC))


@pytest.mark.parametrize("name", ["old_values", "returns"])
def test_rollout_data_requiring_grad_is_refused(name):
    """Refused by every backend but an explicit "reference", with or without the binary."""
    lp, old, adv, mask = _value_inputs(3, 5, torch.float32, "cpu", garbage=False)
    kw = {"clip": 0.2} if name == "old_values" else {}
    args = [lp, old.clone(), adv.clone(), mask]
    args[1 if name == "old_values" else 2].requires_grad_()
    with pytest.raises(ValueError, match=f"value_loss: {name} requires grad"):
        ppokernels.value_loss(*args, **kw)
    ppokernels.value_loss(*args, backend="reference", **kw).loss.backward()


def test_clipfrac_is_between_0_and_1():
    """The clipped samples clip some tokens, not all (the forward test would pass either way)."""
    v, vo, ret, mask = _value_inputs(6, 41, torch.float64, "cpu")
    out = reference.value_loss(v, vo, ret, mask, clip=0.2)
    assert 0 < out.clipfrac < 1
