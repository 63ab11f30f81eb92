"""Parity of ppokernels.compat.openrlhf with the released openrlhf 0.11.2 (pip install --no-deps):
values and gradients within fp32 rounding, masks with right padding and multi-turn holes.

OpenRLHF's modules import GPU-only packages at import time: ``deepspeed`` (openrlhf.models.utils,
.model), ``flash_attn.bert_padding`` / ``flash_attn.utils.distributed`` (ring attention) and
``vllm`` (the Ray rollout engine, imported by the experience maker). None of them is called by
the functions tested here, so ``_stub_gpu_packages`` puts placeholder modules for exactly these
three roots into ``sys.modules`` while OpenRLHF is imported, then removes them again (so that
``log_probs_from_logits`` takes its pure-PyTorch path, as on a machine without flash-attn).
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from unittest import mock

import pytest
import torch

import ppokernels.compat.openrlhf as co

from ._compat_data import close as _close
from ._compat_data import data as _data
from ._compat_data import error as _error

STUBBED = ("deepspeed", "flash_attn", "vllm")


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in STUBBED:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []

        def attr(name):  # any attribute: a placeholder object (only decorators/classes use them)
            if name.startswith("__"):
                raise AttributeError(name)
            return mock.MagicMock(name=f"{spec.name}.{name}")

        module.__getattr__ = attr
        return module

    def exec_module(self, module):
        pass


@contextlib.contextmanager
def _stub_gpu_packages():
    if all(importlib.util.find_spec(root) is not None for root in STUBBED):
        yield  # a GPU machine with the real packages
        return
    finder = _StubFinder()
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n.split(".")[0] in STUBBED]:
            if isinstance(sys.modules[name].__spec__.loader, _StubFinder):
                del sys.modules[name]


try:
    with _stub_gpu_packages():
        import openrlhf.models.loss as orl_loss
        import openrlhf.models.utils as orl_utils
        from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker
except ImportError as e:  # pragma: no cover
    pytest.skip(f"openrlhf 0.11.2 not importable: {e}", allow_module_level=True)


def _run(fn, x, *args, seed=1):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x, *args)
    first = out[0] if isinstance(out, tuple) else out
    g = torch.randn(first.shape, generator=torch.Generator().manual_seed(seed))
    (grad,) = torch.autograd.grad((first * g).sum(), [x])
    return out, grad


def _policy_inputs(seed=6):
    old, adv, noise, mask = _data(seed=seed)
    lp = old + 0.4 * noise
    lp[0, 0] = old[0, 0] + 25.0  # beyond the +-20 log-ratio clamp
    rollout = old + 0.3 * torch.randn(old.shape, generator=torch.Generator().manual_seed(seed))
    return old, lp, adv, mask, rollout


GLOBAL = [{}, {"dp_size": 2, "batch_num_tokens": 61, "global_batch_size": 10}]


@pytest.mark.parametrize("kw", GLOBAL)
@pytest.mark.parametrize("token_level", [True, False])
@pytest.mark.parametrize("clip", [(0.2, 0.2, None), (0.2, 0.28, 3.0), (0.1, 0.3, 1.5)])
def test_policy_loss_ppo(kw, token_level, clip):
    old, lp, adv, mask, _ = _policy_inputs()
    low, high, dual = clip
    want = orl_loss.PolicyLoss(low, high, dual, token_level)
    got = co.PolicyLoss(low, high, dual, token_level)
    ow, gw = _run(lambda x: want(x, old, adv, mask, **kw), lp)
    oo, go = _run(lambda x: got(x, old, adv, mask, **kw), lp)
    for w, o in zip(ow, oo, strict=True):
        if w is None:
            assert o is None
        else:
            _close(o, w)
    _close(go, gw)


@pytest.mark.parametrize(
    "level,mode,gating,thr",
    [
        ("token", "mask", "ratio", (0.8, 1.25)),
        ("token", "clip", "ratio", (0.8, 1.25)),
        ("seq", "mask", "ratio", (0.9, 1.1)),
        ("token", "mask", "binary_kl", (0.0, 0.01)),
        ("seq", "mask", "tv", (0.0, 0.05)),
    ],
)
def test_policy_loss_is_correction(level, mode, gating, thr):
    old, lp, adv, mask, rollout = _policy_inputs(seed=7)
    args = (0.2, 0.28, 3.0, True, "ppo", level, mode, gating, thr)
    ow, gw = _run(lambda x: orl_loss.PolicyLoss(*args)(x, old, adv, mask, rollout), lp)
    oo, go = _run(lambda x: co.PolicyLoss(*args)(x, old, adv, mask, rollout), lp)
    for w, o in zip(ow, oo, strict=True):
        _close(o, w)
    _close(go, gw)


@pytest.mark.parametrize("kw", GLOBAL)
@pytest.mark.parametrize("is_level", ["off", "token"])
def test_policy_loss_gspo(kw, is_level):
    old, lp, _, mask, rollout = _policy_inputs(seed=8)
    lp[0, 0] = old[0, 0] + 0.5
    adv = torch.randn(mask.shape[0], 1).expand_as(mask).contiguous()  # per-sequence advantages
    args = (0.2, 0.28, None, True, "gspo", is_level)
    ow, gw = _run(lambda x: orl_loss.PolicyLoss(*args)(x, old, adv, mask, rollout, **kw), lp)
    oo, go = _run(lambda x: co.PolicyLoss(*args)(x, old, adv, mask, rollout, **kw), lp)
    for w, o in zip(ow[:3], oo[:3], strict=True):
        _close(o, w)
    _close(go, gw)


@pytest.mark.parametrize("kw", GLOBAL)
@pytest.mark.parametrize("token_level", [True, False])
@pytest.mark.parametrize("clip", [None, 0.5])
def test_value_loss(kw, token_level, clip):
    values, old, returns, mask = _data(seed=9)
    ow, gw = _run(
        lambda v: orl_loss.ValueLoss(clip, token_level)(v, old, returns, mask, **kw), values
    )
    oo, go = _run(lambda v: co.ValueLoss(clip, token_level)(v, old, returns, mask, **kw), values)
    _close(oo, ow)
    _close(go, gw)


@pytest.mark.parametrize("kw", GLOBAL)
@pytest.mark.parametrize("token_level", [True, False])
def test_aggregate_loss(kw, token_level):
    x, _, _, mask = _data(seed=10)
    ow, gw = _run(lambda a: orl_loss.aggregate_loss(a, mask, token_level, **kw), x)
    oo, go = _run(lambda a: co.aggregate_loss(a, mask, token_level, **kw), x)
    _close(oo, ow)
    _close(go, gw)


@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
@pytest.mark.parametrize("unbiased,with_old", [(False, False), (True, False), (True, True)])
def test_compute_approx_kl(est, unbiased, with_old):
    lp, base, old, _ = _data(seed=11, scale=5.0)  # |x| past both clamps
    old = old if with_old else None
    ow, gw = _run(lambda a: orl_utils.compute_approx_kl(a, base, old, est, unbiased), lp)
    oo, go = _run(lambda a: co.compute_approx_kl(a, base, old, est, unbiased), lp)
    assert oo.dtype == ow.dtype
    _close(oo, ow)
    _close(go, gw)


REFUSED = [  # PolicyLoss's constructor checks, one per case, and where two fail the first wins
    dict(dual_clip=1.0),
    dict(dual_clip=0.5, is_correction_level="sequence"),
    dict(is_correction_level="sequence"),
    dict(is_correction_level="tok", is_correction_mode="truncate"),
    dict(is_correction_mode="truncate"),
    dict(is_correction_mode="truncate", is_correction_gating="kl"),
    dict(is_correction_gating="kl"),
    dict(is_correction_mode="clip", is_correction_level="seq"),
    dict(is_correction_mode="clip", is_correction_level="token", is_correction_gating="tv"),
    dict(is_correction_level="token", is_correction_gating="binary_kl"),
    dict(is_correction_level="seq", is_correction_gating="tv", is_correction_threshold=(0.1, 1)),
]


@pytest.mark.parametrize("bad", REFUSED, ids=lambda b: "-".join(f"{k}={v}" for k, v in b.items()))
def test_refused_inputs_raise_openrlhf_own_errors(bad):
    """What OpenRLHF refuses raises its exception type and message, in its order of checks."""
    assert _error(lambda: co.PolicyLoss(**bad)) == _error(lambda: orl_loss.PolicyLoss(**bad))


def test_refused_calls_raise_openrlhf_own_errors():
    """The loss type (checked when the loss runs) and the KL estimator, against OpenRLHF."""
    lp, old, adv, mask = _data(seed=12)
    for policy_loss_type in ("grpo", "PPO"):
        args = dict(policy_loss_type=policy_loss_type)
        want = _error(lambda a=args: orl_loss.PolicyLoss(**a)(lp, old, adv, mask))
        assert _error(lambda a=args: co.PolicyLoss(**a)(lp, old, adv, mask)) == want
    for est in ("k4", "K1", None):
        want = _error(lambda e=est: orl_utils.compute_approx_kl(lp, old, kl_estimator=e))
        assert _error(lambda e=est: co.compute_approx_kl(lp, old, kl_estimator=e)) == want


@pytest.mark.parametrize("clip_range", [None, (-1.0, 1.0)])
def test_compute_reward(clip_range):
    _, kl, _, mask = _data(seed=12)
    r = torch.randn(mask.shape[0]) * 3
    for coef in (0.05, -1.0):
        _close(
            co.compute_reward(r, coef, kl, mask, clip_range),
            orl_utils.compute_reward(r, coef, kl, mask, clip_range),
        )


def _logits(seed=13, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(3, 5, 1271, generator=g) * 3).to(dtype), torch.randint(
        0, 1271, (3, 5), generator=g
    )


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_log_probs_from_logits(temperature):
    logits, labels = _logits()
    ow, gw = _run(lambda z: orl_utils.log_probs_from_logits(z * 1.0, labels, temperature), logits)
    oo, go = _run(lambda z: co.log_probs_from_logits(z * 1.0, labels, temperature), logits)
    assert oo.dtype == ow.dtype
    _close(oo, ow)
    _close(go, gw)
    z1, z2 = logits.clone(), logits.clone()  # the in-place temperature side effect
    orl_utils.log_probs_from_logits(z1, labels, temperature)
    co.log_probs_from_logits(z2, labels, temperature)
    _close(z2, z1)


def test_compute_entropy_and_masked_mean():
    logits, _ = _logits(seed=14)
    eager = getattr(
        orl_utils.compute_entropy, "_torchdynamo_orig_callable", orl_utils.compute_entropy
    )  # OpenRLHF's function without its torch.compile
    ow, gw = _run(eager, logits)
    oo, go = _run(co.compute_entropy, logits)
    _close(oo, ow)
    _close(go, gw)
    x, _, _, mask = _data(seed=15)
    for dim in (None, -1, 0):
        _close(co.masked_mean(x, mask, dim), orl_utils.masked_mean(x, mask, dim))
    _close(co.masked_mean(x, None), orl_utils.masked_mean(x, None))


@pytest.mark.parametrize("gamma,lambd", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.3)])
def test_experience_maker_scans(gamma, lambd):
    values, rewards, _, mask = _data(seed=16)
    want = RemoteExperienceMaker.get_advantages_and_returns(
        None, values, rewards, mask, gamma, lambd
    )
    got = co.get_advantages_and_returns(None, values, rewards, mask, gamma, lambd)
    for w, o in zip(want, got, strict=True):
        _close(o, w)
    _close(
        co.get_cumulative_returns(None, rewards, mask, gamma),
        RemoteExperienceMaker.get_cumulative_returns(None, rewards, mask, gamma),
    )


def test_patch_unpatch():
    import openrlhf.models as orl_models

    before = (
        orl_loss.PolicyLoss,
        orl_models.PolicyLoss,
        orl_utils.compute_approx_kl,
        RemoteExperienceMaker.get_advantages_and_returns,
    )
    co.patch()
    try:
        assert orl_loss.PolicyLoss is co.PolicyLoss and orl_models.PolicyLoss is co.PolicyLoss
        assert orl_utils.log_probs_from_logits is co.log_probs_from_logits
        assert RemoteExperienceMaker.get_cumulative_returns is co.get_cumulative_returns
    finally:
        co.unpatch()
    after = (
        orl_loss.PolicyLoss,
        orl_models.PolicyLoss,
        orl_utils.compute_approx_kl,
        RemoteExperienceMaker.get_advantages_and_returns,
    )
    assert all(a is b for a, b in zip(before, after, strict=True))
