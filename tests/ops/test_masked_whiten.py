import functools
from collections import defaultdict

import pytest
import torch

import ppokernels
from ppokernels import reference
from ppokernels.testing import TOL, assert_close_to_reference, backend_params, binary_skip_reason

PARAMS = backend_params()
KERNELS = [p for p in PARAMS if p[1] != "reference"]
GROUP_VARIANTS = [("grpo", True), ("grpo", False), ("rloo", True)]


def _data(shape, dtype, device, p_valid=0.7, scale=3.0):
    x = (torch.randn(shape, dtype=torch.float64) * scale + 1.5).to(device=device, dtype=dtype)
    mask = (torch.rand(shape) < p_valid).to(device)
    return x, mask


def _groups(b, device):
    """Shuffled, non-contiguous ids with groups of 1..5 members (singletons included)."""
    sizes = [1, 4, 2, 5, 1, 3, 4, 1, 2]
    ids = torch.cat([torch.full((n,), 7 * k + 100, dtype=torch.int64) for k, n in enumerate(sizes)])
    ids = ids[: b if b <= ids.numel() else None]
    ids = torch.cat([ids, torch.randint(0, 5, (max(b - ids.numel(), 0),)) * 1000])
    return ids[torch.randperm(ids.numel())].to(device)


# ------------------------------------------------------------------------ masked statistics
@pytest.mark.parametrize("device, backend", PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32])
def test_moments(device, backend, dtype, unbiased, mask_dtype):
    x, mask = _data((6, 41), dtype, device)
    mask = mask.to(mask_dtype)
    x.requires_grad_(True)
    mean = ppokernels.masked_mean(x, mask, backend=backend)
    var = ppokernels.masked_var(x, mask, unbiased=unbiased, backend=backend)
    x64 = x.detach().double().requires_grad_()
    e_mean = reference.masked_mean(x64, mask)
    e_var = reference.masked_var(x64, mask, unbiased=unbiased)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert mean.shape == () and var.shape == () and mean.dtype == acc and var.dtype == acc
    torch.testing.assert_close(mean.double(), e_mean, **TOL[dtype])
    torch.testing.assert_close(var.double(), e_var, **TOL[dtype])
    gm, gv = torch.randn(2, dtype=torch.float64)
    (g,) = torch.autograd.grad(mean * gm.to(acc) + var * gv.to(acc), x)
    (e,) = torch.autograd.grad(e_mean * gm + e_var * gv, x64)
    torch.testing.assert_close(g.double(), e, **TOL[dtype])


@pytest.mark.parametrize("device, backend", PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("unbiased", [True, False])
def test_whiten(device, backend, dtype, shift_mean, unbiased):
    x, mask = _data((5, 67), dtype, device)
    x = x.t()  # non-contiguous input
    mask = mask.t()
    x.requires_grad_(True)
    kw = dict(shift_mean=shift_mean, unbiased=unbiased, eps=1e-5)
    out = ppokernels.masked_whiten(x, mask, backend=backend, **kw)
    x64 = x.detach().double().requires_grad_()
    expect = reference.masked_whiten(x64, mask, **kw)
    assert out.shape == x.shape
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(out.double(), expect, **TOL[dtype])
    grad = torch.randn_like(expect)
    (g,) = torch.autograd.grad(out, x, grad.to(out.dtype))
    (e,) = torch.autograd.grad(expect, x64, grad)
    torch.testing.assert_close(g.double(), e, **TOL[dtype])


@pytest.mark.parametrize("device, backend", PARAMS)
def test_gradcheck_masked(device, backend):
    x, mask = _data((3, 7), torch.float64, device)
    x.requires_grad_(True)
    fast = backend == "triton" and device == "cpu"  # the interpreter is slow: random projections
    gradcheck = functools.partial(torch.autograd.gradcheck, fast_mode=fast)
    for shift_mean in [True, False]:
        for unbiased in [True, False]:
            kw = dict(shift_mean=shift_mean, unbiased=unbiased, backend=backend)
            fn = lambda a, kw=kw: ppokernels.masked_whiten(a, mask, **kw)
            assert gradcheck(fn, (x,))
    assert gradcheck(lambda a: ppokernels.masked_mean(a, mask, backend=backend), (x,))
    for unbiased in [True, False]:
        fn = lambda a: ppokernels.masked_var(a, mask, unbiased=unbiased, backend=backend)  # noqa: B023
        assert gradcheck(fn, (x,))


@pytest.mark.parametrize("device, backend", KERNELS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_whiten(device, backend, dtype):
    x, mask = _data((8, 125), dtype, device)
    out = ppokernels.masked_whiten(x, mask, backend=backend)
    expect = reference.masked_whiten(x.double(), mask)
    assert out.dtype == torch.float32
    assert_close_to_reference(out, expect, _verl_whiten(x, mask))  # eager: in the input dtype
    mean = ppokernels.masked_mean(x, mask, backend=backend)
    assert_close_to_reference(mean, reference.masked_mean(x.double(), mask), _verl_mean(x, mask))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # 0 / 0 in the Triton interpreter
@pytest.mark.parametrize("device, backend", PARAMS)
def test_empty_and_undefined(device, backend):
    nan = float("nan")
    x, _ = _data((3, 5), torch.float32, device)
    zero = torch.zeros(3, 5, dtype=torch.bool, device=device)
    assert ppokernels.masked_mean(x, zero, backend=backend).isnan()
    assert ppokernels.masked_var(x, zero, unbiased=False, backend=backend).isnan()
    assert ppokernels.masked_var(x, zero, backend=backend).isnan()
    assert ppokernels.masked_whiten(x, zero, backend=backend).isnan().all()
    one = zero.clone()
    one[1, 2] = True  # a single valid entry: the unbiased variance is undefined
    assert ppokernels.masked_var(x, one, backend=backend).isnan()
    assert ppokernels.masked_var(x, one, unbiased=False, backend=backend).item() == 0.0
    assert ppokernels.masked_mean(x, one, backend=backend).item() == x[1, 2].item()
    empty = torch.empty(0, 4, device=device)
    e_mask = torch.empty(0, 4, dtype=torch.bool, device=device)
    assert ppokernels.masked_mean(empty, e_mask, backend=backend).isnan()
    assert ppokernels.masked_whiten(empty, e_mask, backend=backend).shape == (0, 4)
    # masked padding holding inf / NaN does not leak into the statistics
    y, mask = _data((4, 9), torch.float32, device)
    y[~mask] = nan
    y[0, 0], mask[0, 0] = float("inf"), False
    mean = ppokernels.masked_mean(y, mask, backend=backend)
    torch.testing.assert_close(mean, y[mask].mean())
    var = ppokernels.masked_var(y, mask, backend=backend)
    torch.testing.assert_close(var, y[mask].var())
    out = ppokernels.masked_whiten(y, mask, backend=backend)
    assert torch.isfinite(out[mask]).all()
    s = torch.empty(0, device=device)
    ids = torch.empty(0, dtype=torch.int64, device=device)
    assert ppokernels.group_advantages(s, ids, backend=backend).shape == (0,)


@pytest.mark.parametrize("device", ["cpu"])
def test_cpp_large_and_deterministic(device):
    if binary_skip_reason():
        pytest.skip(binary_skip_reason())
    x, mask = _data((64, 40_000), torch.float32, device, scale=100.0)  # many chunks of partials
    expect = reference.masked_whiten(x.double(), mask)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            outs.append(ppokernels.masked_whiten(x, mask, backend="cpp"))
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(outs[0].double(), expect, rtol=1e-5, atol=1e-5)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])  # same bits
    m = ppokernels.masked_mean(x, mask, backend="cpp")
    torch.testing.assert_close(
        m.double(), reference.masked_mean(x.double(), mask), rtol=1e-6, atol=0
    )
    v = ppokernels.masked_var(x, mask, backend="cpp")
    torch.testing.assert_close(
        v.double(), reference.masked_var(x.double(), mask), rtol=1e-6, atol=0
    )
    # backward across many chunks (the merge of the chunk statistics)
    x.requires_grad_(True)
    grad = torch.randn_like(x)
    (g,) = torch.autograd.grad(ppokernels.masked_whiten(x, mask, backend="cpp"), x, grad)
    x64 = x.detach().double().requires_grad_()
    (e,) = torch.autograd.grad(reference.masked_whiten(x64, mask), x64, grad.double())
    torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-6)


# -------------------------------------------------------------------------- group baselines
@pytest.mark.parametrize("device, backend", PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("estimator, norm_by_std", GROUP_VARIANTS)
def test_group_advantages(device, backend, dtype, estimator, norm_by_std):
    ids = _groups(40, device)
    s = (torch.randn(40, dtype=torch.float64) * 2).to(device=device, dtype=dtype)
    s.requires_grad_(True)
    kw = dict(estimator=estimator, norm_by_std=norm_by_std, eps=1e-4)
    out = ppokernels.group_advantages(s, ids.to(torch.int32), backend=backend, **kw)
    s64 = s.detach().double().requires_grad_()
    expect = reference.group_advantages(s64, ids, **kw)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(out.double(), expect, **TOL[dtype])
    grad = torch.randn_like(expect)
    (g,) = torch.autograd.grad(out, s, grad.to(out.dtype))
    (e,) = torch.autograd.grad(expect, s64, grad)
    torch.testing.assert_close(g.double(), e, **TOL[dtype])


@pytest.mark.parametrize("device, backend", PARAMS)
@pytest.mark.parametrize("estimator, norm_by_std", GROUP_VARIANTS)
def test_group_gradcheck(device, backend, estimator, norm_by_std):
    ids = _groups(14, device)
    s = torch.randn(14, dtype=torch.float64, device=device, requires_grad=True)

    def fn(v):
        return ppokernels.group_advantages(
            v, ids, estimator=estimator, norm_by_std=norm_by_std, backend=backend
        )

    assert torch.autograd.gradcheck(fn, (s,))


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


# ----------------------------------------- parity with veRL / OpenRLHF / TRL (independent loops)
def _verl_mean(x, m):
    return (x * m).sum() / (m.sum() + 1e-8)  # veRL's masked_mean (no NaN: + 1e-8)


def _verl_whiten(x, m, shift_mean=True):
    """veRL / TRL masked_whiten: biased variance over the mask, then Bessel n / (n - 1)."""
    mean = _verl_mean(x, m)
    var = _verl_mean((x - mean) ** 2, m)
    n = m.sum()
    var = var * n / (n - 1)
    y = (x - mean) * torch.rsqrt(var + 1e-8)
    return y if shift_mean else y + mean


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
    x, mask = _data((4, 33), torch.float64, "cpu")
    for shift_mean in [True, False]:
        out = ppokernels.masked_whiten(
            x.to(device), mask.to(device), shift_mean=shift_mean, backend=backend
        )
        # veRL's + 1e-8 in the mean's denominator is the only difference
        torch.testing.assert_close(
            out.cpu(), _verl_whiten(x, mask, shift_mean), rtol=1e-7, atol=1e-7
        )


# ------------------------------------------------------------------------ opcheck, compile
def test_opcheck_and_compile():
    if binary_skip_reason():
        pytest.skip(binary_skip_reason())
    ops = torch.ops.ppokernels
    x, mask = _data((4, 9), torch.float32, "cpu")
    x.requires_grad_(True)
    torch.library.opcheck(ops.masked_moments.default, (x, mask, True))
    torch.library.opcheck(ops.masked_whiten.default, (x, mask.long(), False, True, 1e-8))
    g3 = torch.randn(3)
    mom = ops.masked_moments(x.detach(), mask, True)
    torch.library.opcheck(ops.masked_moments_backward.default, (g3, x.detach(), mask, mom, True))
    g = torch.randn(4, 9)
    torch.library.opcheck(
        ops.masked_whiten_backward.default, (g, x.detach(), mask, True, True, 0.1)
    )
    s = torch.randn(12, requires_grad=True)
    ids = torch.randint(0, 4, (12,))
    ids[:4] = torch.arange(4)  # every group present
    for est in ["grpo", "rloo"]:
        torch.library.opcheck(ops.group_advantages.default, (s, ids, 4, est, 1e-6, True))
    gb = (torch.randn(12), s.detach(), ids, 4, "grpo", 1e-6, True)
    torch.library.opcheck(ops.group_advantages_backward.default, gb)

    fn = torch.compile(
        lambda a, m: (
            ppokernels.masked_whiten(a, m, backend="cpp").square().sum()
            + ppokernels.masked_var(a, m, backend="cpp")
        ),
        fullgraph=True,
    )
    xd = x.detach()
    want = ppokernels.masked_whiten(xd, mask).square().sum() + ppokernels.masked_var(xd, mask)
    torch.testing.assert_close(fn(xd, mask), want)
    fg = torch.compile(
        lambda v, i: ops.group_advantages(v, i, 4, "grpo", 1e-6, True).sum(), fullgraph=True
    )
    torch.testing.assert_close(
        fg(s.detach(), ids), ppokernels.group_advantages(s.detach(), ids).sum()
    )


@pytest.mark.cuda
def test_opcheck_cuda():
    x, mask = _data((4, 9), torch.float32, "cuda")
    x.requires_grad_(True)
    s = torch.randn(12, device="cuda", requires_grad=True)
    ids = torch.arange(12, device="cuda") % 4
    for suffix in ["", "_triton"]:
        ops = torch.ops.ppokernels
        torch.library.opcheck(getattr(ops, "masked_moments" + suffix).default, (x, mask, True))
        args = (x, mask, False, True, 1e-8)
        torch.library.opcheck(getattr(ops, "masked_whiten" + suffix).default, args)
        args = (s, ids, 4, "rloo", 1e-6, True)
        torch.library.opcheck(getattr(ops, "group_advantages" + suffix).default, args)


def test_bad_input():
    x, mask = _data((4, 5), torch.float32, "cpu")
    s, ids = torch.randn(6), torch.arange(6)
    with pytest.raises(ValueError, match="masked_whiten: mask has shape"):
        ppokernels.masked_whiten(x, mask.float()[:, :3])
    with pytest.raises(ValueError, match="masked_mean: mask has shape"):
        ppokernels.masked_mean(x, mask[0])
    with pytest.raises(TypeError, match="masked_var: x must be float"):
        ppokernels.masked_var(x.long(), mask)
    with pytest.raises(ValueError, match="masked_whiten: mask is on meta"):
        ppokernels.masked_whiten(x, mask.to("meta"))
    with pytest.raises(ValueError, match="masked_whiten: eps must be >= 0"):
        ppokernels.masked_whiten(x, mask, eps=-1e-8)
    with pytest.raises(TypeError, match="masked_whiten: shift_mean must be a bool"):
        ppokernels.masked_whiten(x, mask, shift_mean=None)
    with pytest.raises(ValueError, match="masked_var: backend"):
        ppokernels.masked_var(x, mask, backend="fast")
    with pytest.raises(ValueError, match="masked_whiten: backend"):
        ppokernels.masked_whiten(x, mask, backend="fast")
    with pytest.raises(ValueError, match="group_advantages: group_index has shape"):
        ppokernels.group_advantages(s, ids[:5])
    with pytest.raises(ValueError, match="group_advantages: scores must have 1 dim"):
        ppokernels.group_advantages(x, ids)
    with pytest.raises(TypeError, match="group_advantages: group_index must be an integer"):
        ppokernels.group_advantages(s, ids.float())
    with pytest.raises(TypeError, match="group_advantages: group_index must be an integer"):
        ppokernels.group_advantages(s, ids > 2)
    with pytest.raises(ValueError, match="group_advantages: estimator"):
        ppokernels.group_advantages(s, ids, estimator="ppo")
    with pytest.raises(ValueError, match="group_advantages: eps must be >= 0"):
        ppokernels.group_advantages(s, ids, eps=-1.0)
    with pytest.raises(ValueError, match="group_advantages: group_index is on meta"):
        ppokernels.group_advantages(s, ids.to("meta"))
    if ppokernels.info()["cpp_cpu_kernels"]:  # the op itself: a clear error, never a crash
        with pytest.raises(RuntimeError, match="group id 6 out of range"):
            torch.ops.ppokernels.group_advantages(s, ids + 2, 6, "grpo", 1e-6, True)
        with pytest.raises(RuntimeError, match="unknown estimator"):
            torch.ops.ppokernels.group_advantages(s, ids, 6, "x", 1e-6, True)
