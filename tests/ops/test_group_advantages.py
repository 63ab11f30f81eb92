"""group_advantages: the conformance blocks from ``ppokernels.testing`` (GRPO with and without
the std, RLOO, shuffled non-contiguous group ids with singletons, empty input, bad input), then
what is special to it: equal scores, low precision against eager, the trainers' own loops, the
registered op's own errors."""

from collections import defaultdict

import pytest
import torch

import ppokernels
from ppokernels import reference
from ppokernels.testing import (
    OpSpec,
    Sample,
    assert_close_to_reference,
    backend_params,
    binary_skip_reason,
    conformance_tests,
)

PARAMS = backend_params()
KERNELS = [p for p in PARAMS if p[1] != "reference"]
GROUP_VARIANTS = [("grpo", True), ("grpo", False), ("rloo", True)]


def _groups(b, device):
    """Shuffled, non-contiguous ids with groups of 1..5 members (singletons included)."""
    sizes = [1, 4, 2, 5, 1, 3, 4, 1, 2]
    ids = torch.cat([torch.full((n,), 7 * k + 100, dtype=torch.int64) for k, n in enumerate(sizes)])
    ids = ids[: b if b <= ids.numel() else None]
    ids = torch.cat([ids, torch.randint(0, 5, (max(b - ids.numel(), 0),)) * 1000])
    return ids[torch.randperm(ids.numel())].to(device)


def samples(device, dtype):
    out = []
    for estimator, norm_by_std in GROUP_VARIANTS:
        name = f"{estimator}-std{int(norm_by_std)}"
        kw = dict(estimator=estimator, norm_by_std=norm_by_std, eps=1e-4)
        ids = _groups(40, device).to(torch.int32)
        s = (torch.randn(40, dtype=torch.float64) * 2).to(device=device, dtype=dtype)
        out.append(Sample((s, ids), kw, name))
        kw = dict(estimator=estimator, norm_by_std=norm_by_std)
        s = torch.randn(14, dtype=torch.float64).to(device=device, dtype=dtype)
        out.append(Sample((s, _groups(14, device)), kw, "small-" + name))
    empty = torch.empty(0, dtype=dtype, device=device)
    out.append(Sample((empty, torch.empty(0, dtype=torch.int64, device=device)), {}, "empty"))
    return out


def _opcheck(s):
    scores = s.args[0].requires_grad_()
    ids = torch.arange(scores.numel(), device=scores.device) % 4  # every group present
    kw = dict(estimator="grpo", eps=1e-6, norm_by_std=True) | s.kwargs
    args = (scores, ids, 4, kw["estimator"], kw["eps"], kw["norm_by_std"])
    checks = [(torch.ops.ppokernels.group_advantages.default, args)]
    grad = torch.randn_like(scores)
    checks.append(
        (torch.ops.ppokernels.group_advantages_backward.default, (grad, scores.detach(), *args[1:]))
    )
    return checks


def _compile(s):
    """The public function maps the ids to 0..G-1 (data-dependent): compile the op after it."""
    kw = dict(estimator="grpo", eps=1e-6, norm_by_std=True) | s.kwargs
    ids = torch.arange(s.args[0].numel(), device=s.args[0].device) % 4

    def fn(scores):
        args = (4, kw["estimator"], kw["eps"], kw["norm_by_std"])
        return torch.ops.ppokernels.group_advantages(scores, ids, *args)

    return fn, (s.args[0],)


def _bad_inputs():
    x = torch.randn(4, 5)
    s, ids = torch.randn(6), torch.arange(6)
    ga = ppokernels.group_advantages
    return [
        (lambda: ga(s, ids[:5]), ValueError, "group_advantages: group_index has shape"),
        (lambda: ga(x, ids), ValueError, "group_advantages: scores must have 1 dim"),
        (lambda: ga(s, ids.float()), TypeError, "group_advantages: group_index must be an integer"),
        (lambda: ga(s, ids > 2), TypeError, "group_advantages: group_index must be an integer"),
        (lambda: ga(s, ids, estimator="ppo"), ValueError, "group_advantages: estimator"),
        (lambda: ga(s, ids, eps=-1.0), ValueError, "group_advantages: eps must be >= 0"),
        (lambda: ga(s, ids.to("meta")), ValueError, "group_advantages: group_index is on meta"),
    ]


SPEC = OpSpec(
    name="group_advantages",
    fn=ppokernels.group_advantages,
    reference=reference.group_advantages,
    samples=samples,
    bad_inputs=_bad_inputs(),
    opcheck=_opcheck,
    compile=_compile,
    gradcheck_samples=["small-" + f"{e}-std{int(n)}" for e, n in GROUP_VARIANTS],
    opcheck_samples=["small-grpo-std1", "small-rloo-std1"],
)
globals().update(conformance_tests(SPEC))


def test_the_op_refuses_bad_ids_and_estimators():
    """The registered op itself: a clear error, never a crash."""
    if binary_skip_reason():
        pytest.skip(binary_skip_reason())
    s, ids = torch.randn(6), torch.arange(6)
    with pytest.raises(RuntimeError, match="group id 6 out of range"):
        torch.ops.ppokernels.group_advantages(s, ids + 2, 6, "grpo", 1e-6, True)
    with pytest.raises(RuntimeError, match="unknown estimator"):
        torch.ops.ppokernels.group_advantages(s, ids, 6, "x", 1e-6, True)


@pytest.mark.parametrize("device, backend", PARAMS)
def test_group_equal_scores(device, backend):
    """std 0: advantages 0, and a finite gradient (the std's subgradient 0)."""
    s = torch.tensor([1.0, 1.0, 1.0, 2.0, 3.0], device=device, requires_grad=True)
    ids = torch.tensor([4, 4, 4, 9, 9], device=device)
    out = ppokernels.group_advantages(s, ids, backend=backend)
    assert torch.equal(out[:3].detach(), torch.zeros(3, device=device))
    if backend != "reference":  # autograd through torch.std gives NaN at std 0
        (g,) = torch.autograd.grad(out, s, torch.ones_like(out))
        assert torch.isfinite(g).all()


@pytest.mark.parametrize("device, backend", KERNELS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_group(device, backend, dtype):
    ids = _groups(64, device)
    s = torch.randn(64, dtype=torch.float64).to(device=device, dtype=dtype)
    out = ppokernels.group_advantages(s, ids, backend=backend)
    expect = reference.group_advantages(s.double(), ids)
    assert_close_to_reference(out, expect, _verl_grpo(s, ids, 1e-6, True))


# --------------------------------------- parity with veRL / OpenRLHF (independent loops)
def _verl_grpo(scores, index, eps, norm_by_std):
    """veRL compute_grpo_outcome_advantage (loop version), per-sequence part."""
    members = defaultdict(list)
    for i in range(len(scores)):
        members[int(index[i])].append(scores[i])
    stats = {}
    for k, v in members.items():
        if len(v) == 1:
            stats[k] = (
                torch.tensor(0.0, dtype=scores.dtype),
                torch.tensor(1.0, dtype=scores.dtype),
            )
        else:
            t = torch.stack(v)
            stats[k] = (torch.mean(t), torch.std(t))
    out = scores.clone()
    for i in range(len(scores)):
        mean, std = stats[int(index[i])]
        out[i] = (scores[i] - mean) / (std + eps) if norm_by_std else scores[i] - mean
    return out


def _verl_rloo(scores, index):
    """veRL compute_rloo_outcome_advantage (loop version): singletons keep their score."""
    members = defaultdict(list)
    for i in range(len(scores)):
        members[int(index[i])].append(scores[i])
    out = scores.clone()
    for i in range(len(scores)):
        v = members[int(index[i])]
        n = len(v)
        if n > 1:
            mean = torch.mean(torch.stack(v))
            out[i] = scores[i] * n / (n - 1) - mean * n / (n - 1)
    return out


def _openrlhf_rloo(scores, index):
    """OpenRLHF: r - (sum_g r - r) / (n - 1), the mean of the other members (groups n > 1)."""
    out = scores.clone()
    for i in range(len(scores)):
        same = [j for j in range(len(scores)) if int(index[j]) == int(index[i])]
        if len(same) > 1:
            out[i] = scores[i] - (sum(scores[j] for j in same) - scores[i]) / (len(same) - 1)
    return out


@pytest.mark.parametrize("device, backend", PARAMS)
def test_trainer_parity(device, backend):
    ids = _groups(40, "cpu")
    s = torch.randn(40, dtype=torch.float64)
    dev_ids = ids.to(device)

    def ours(**kw):
        return ppokernels.group_advantages(s.to(device), dev_ids, backend=backend, **kw).cpu()

    torch.testing.assert_close(ours(), _verl_grpo(s, ids, 1e-6, True))
    torch.testing.assert_close(ours(norm_by_std=False), _verl_grpo(s, ids, 1e-6, False))
    torch.testing.assert_close(ours(estimator="rloo"), _verl_rloo(s, ids))
    multi = torch.tensor([(ids == k).sum() > 1 for k in ids])
    torch.testing.assert_close(ours(estimator="rloo")[multi], _openrlhf_rloo(s, ids)[multi])
