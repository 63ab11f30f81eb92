"""What is special to ppo_policy_loss's loss specs (the conformance blocks of
test_ppo_policy_loss.py run every spec on every backend against the fp64 reference): a mode name
means the spec's defaults, the C++ op checks its loss_params, bf16 inputs, bad spec options.
(tests/compat/test_verl_modes.py and tests/compat/test_trl.py check the modes against the
trainers' own functions.)"""

import pytest
import torch

import ppokernels
from ppokernels import reference
from ppokernels.losses import GSPO
from ppokernels.testing import binary_skip_reason

from .test_ppo_policy_loss import KERNELS, MODES, PARAMS
from .test_ppo_policy_loss import _mode_inputs as _inputs


def _mode(name):
    return dict(MODES[name])


@pytest.mark.parametrize("device, backend", PARAMS)
def test_mode_name_is_the_default_spec(device, backend):
    lp, old, adv, mask = _inputs(4, 21, torch.float32, device)
    a = ppokernels.ppo_policy_loss(lp, old, adv, mask, loss="gspo", backend=backend)
    b = ppokernels.ppo_policy_loss(lp, old, adv, mask, loss=GSPO(), backend=backend)
    for x, y in zip(a, b, strict=True):
        assert (x is None and y is None) or torch.equal(x, y)


def test_the_cpp_op_checks_its_loss_params():
    """A direct call of the op with a wrong mode or parameter count is a clear error."""
    if binary_skip_reason():
        pytest.skip(binary_skip_reason())
    lp, old, adv, mask = _inputs(3, 11, torch.float64, "cpu", garbage=False)
    args = (None, None, None)
    tail = (20.0, "token-mean", None, None, 0.0, "k3", None, 0.0)
    op = torch.ops.ppokernels.ppo_policy_loss
    with pytest.raises(RuntimeError, match="ppo_policy_loss: loss_mode 'sapo' takes 2 loss_params"):
        op(lp, old, adv, mask, *args, "sapo", [1.0], *tail)
    with pytest.raises(RuntimeError, match="ppo_policy_loss: unknown loss_mode 'ppo'"):
        op(lp, old, adv, mask, *args, "ppo", [], *tail)
    with pytest.raises(RuntimeError, match="ppo_policy_loss: loss_params must not be NaN"):
        op(lp, old, adv, mask, *args, "dro", [float("nan")], *tail)


@pytest.mark.parametrize("device, backend", KERNELS)
@pytest.mark.parametrize("mode", ["gspo", "sapo", "cispo", "geo_mean", "dppo_kl", "dro", "vespo"])
def test_bf16_inputs(device, backend, mode):
    """bf16 data run in fp32: the fp64 reference of the same (bf16) inputs, to fp32 accuracy."""
    lp, old, adv, mask = _inputs(6, 200, torch.bfloat16, device, garbage=False)
    kw = _mode(mode)
    x = lp.requires_grad_()
    out = ppokernels.ppo_policy_loss(x, old, adv, mask, **kw, backend=backend)
    c = lambda t: t.detach().cpu().double()  # noqa: E731
    x64 = c(lp).requires_grad_()
    exp = reference.ppo_policy_loss(x64, c(old), c(adv), mask.cpu(), **kw)
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(c(out.loss), exp.loss, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(c(out.clipfrac), exp.clipfrac, rtol=2e-5, atol=2e-6)
    (g,) = torch.autograd.grad(out.loss, x)
    (g64,) = torch.autograd.grad(exp.loss, x64)
    assert g.dtype == torch.bfloat16
    torch.testing.assert_close(c(g), g64, rtol=1e-2, atol=1e-5)  # the bf16 rounding of g


BAD = [
    (ValueError, "ppo_policy_loss: loss: unknown loss mode 'ppo'", dict(loss="ppo")),
    (TypeError, "ppo_policy_loss: loss must be a loss spec", dict(loss=0.2)),
    (ValueError, "ppo_policy_loss: loss: DRO .'dro'.: .* missing 1 required", dict(loss="dro")),
]


@pytest.mark.parametrize("device, backend", PARAMS)
@pytest.mark.parametrize("exc, msg, kw", BAD, ids=[b[1][:24] for b in BAD])
def test_bad_mode_options(device, backend, exc, msg, kw):
    lp, old, adv, mask = _inputs(3, 5, torch.float32, device)
    with pytest.raises(exc, match=msg):
        ppokernels.ppo_policy_loss(lp, old, adv, mask, **kw, backend=backend)
