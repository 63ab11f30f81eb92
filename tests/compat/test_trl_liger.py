"""Parity of ppokernels.compat.trl_liger.LigerFusedLinearGRPOLoss with the released Liger-Kernel
0.8.5 class (liger_kernel.chunked_loss.grpo_loss, run eagerly with compiled=False): loss, metrics
and the gradients of _input, lin_weight and bias, for every loss type and option it takes."""

from __future__ import annotations

import inspect
import os
import sys
import tempfile
import types

import pytest
import torch
import torch.multiprocessing as mp

from ._compat_data import error as _error

liger_grpo = pytest.importorskip("liger_kernel.chunked_loss.grpo_loss")
grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer")

import ppokernels.compat.trl as ct  # noqa: E402
import ppokernels.compat.trl_liger as trl_liger  # noqa: E402
from ppokernels.compat.trl_liger import LigerFusedLinearGRPOLoss  # noqa: E402

Liger = liger_grpo.LigerFusedLinearGRPOLoss
B, T, H, V = 3, 9, 16, 61
TOL = dict(atol=1e-5, rtol=1e-5)
CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
# (loss_type, importance_sampling_level) pairs Liger 0.8.5 accepts
CASES = [(t, "token") for t in ct.LOSS_TYPES] + [(t, "sequence") for t in CLIPPED]


def _mask():
    """Row 0: all T with two holes; row 1: right padding after 6 with a hole; row 2: nothing."""
    m = torch.zeros(B, T, dtype=torch.long)
    m[0] = 1
    m[0, 3:5] = 0
    m[1, :6] = 1
    m[1, 2] = 0
    return m


def _batch(seed=0, temperature=1.0, with_bias=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g)
    w = torch.randn(V, H, generator=g) * 0.3
    b = torch.randn(V, generator=g) * 0.2 if with_bias else None
    y = torch.randint(0, V, (B, T), generator=g)
    z = (h @ w.T + (0.0 if b is None else b)) / temperature
    lp = torch.log_softmax(z, -1).gather(-1, y[..., None])[..., 0]  # to place old / ref near it
    return dict(
        h=h,
        w=w,
        b=b,
        y=y,
        m=_mask(),
        adv=torch.tensor([0.9, -1.3, 0.4]),
        # row offsets: at sequence level row 0 (A > 0, r > 1 + eps) is clipped, row 1 (A < 0,
        # r > 1) is not, so both the clip ratio and the gradient are exercised
        old=lp + 0.3 * torch.randn(B, T, generator=g) - 0.5,
        ref=lp + 0.3 * torch.randn(B, T, generator=g),
        vllm=torch.rand(B, T, generator=g) + 0.5,  # padding too: Liger reads every column
        ref_h=torch.randn(B, T, H, generator=g),
        ref_w=torch.randn(V, H, generator=g) * 0.3,
    )


def _run(cls, d, init, **call):
    leaves = [d["h"].clone().requires_grad_(), d["w"].clone().requires_grad_()]
    bias = None if d["b"] is None else d["b"].clone().requires_grad_()
    loss, metrics = cls(compiled=False, **init)(
        leaves[0], leaves[1], d["y"], d["m"], d["adv"], bias=bias, **call
    )
    grads = torch.autograd.grad(loss, leaves + ([] if bias is None else [bias]))
    return loss, metrics, grads


def _parity(d, init, **call):
    want = _run(Liger, d, init, **call)
    got = _run(LigerFusedLinearGRPOLoss, d, init, **call)
    torch.testing.assert_close(got[0], want[0], **TOL, msg="loss")
    assert len(got[1]) == len(want[1])
    for i, (a, x) in enumerate(zip(got[1], want[1], strict=True)):
        torch.testing.assert_close(a.float(), x.float(), **TOL, msg=f"metric {i}")
    for name, a, x in zip(("_input", "lin_weight", "bias"), got[2], want[2], strict=False):
        torch.testing.assert_close(a, x, **TOL, msg=f"grad {name}")
    return got


def _init(loss_type, level, beta, **kw):
    eps_high = 1.1 if loss_type == "cispo" else 0.28  # cispo caps the ratio at eps_high itself
    return dict(
        loss_type=loss_type,
        importance_sampling_level=level,
        beta=beta,
        epsilon_low=0.2,
        epsilon_high=eps_high,
        max_completion_length=T + 3,
        **kw,
    )


@pytest.mark.parametrize(("loss_type", "level"), CASES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("with_old", [True, False])
@pytest.mark.parametrize("variant", ["plain", "bias-temperature-vllm-num_items"])
def test_matches_liger(loss_type, level, beta, with_old, variant):
    rich = variant != "plain"
    d = _batch(seed=1, temperature=0.7 if rich else 1.0, with_bias=rich)
    init = _init(loss_type, level, beta, temperature=0.7 if rich else 1.0)
    call = dict(ref_per_token_logps=d["ref"], old_per_token_logps=d["old"] if with_old else None)
    if rich:
        call.update(vllm_is_ratio=d["vllm"], num_items_in_batch=torch.tensor(23.0))
    loss, metrics, _ = _parity(d, init, **call)
    assert len(metrics) == (2 if beta else 1)
    if with_old and loss_type in ("grpo", "dapo", "luspo", "cispo"):
        assert metrics[-1] > 0  # the data clip some tokens: the clip ratio is exercised


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "luspo", "dr_grpo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_bias_corrected_kl_and_delta(loss_type, level):
    d = _batch(seed=2, with_bias=True)
    init = _init(loss_type, level, 0.05, use_bias_correction_kl=True, delta=1.5)
    _parity(d, init, ref_per_token_logps=d["ref"], old_per_token_logps=d["old"])


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "luspo", "sapo", "cispo", "vespo"])
@pytest.mark.parametrize("shape", ["B", "B1"])
def test_per_sequence_vllm_ratio(loss_type, shape):
    d = _batch(seed=3)
    v = d["vllm"][:, 0] if shape == "B" else d["vllm"][:, :1]
    level = "sequence" if loss_type == "luspo" else "token"
    init = _init(loss_type, level, 0.0, use_ref_model=False)
    _parity(d, init, old_per_token_logps=d["old"], vllm_is_ratio=v)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "luspo"])
def test_reference_from_ref_input(loss_type):
    """No ref_per_token_logps: the reference log-probs come from ref_input @ ref_weight.T."""
    d = _batch(seed=4, temperature=0.8, with_bias=True)
    init = _init(loss_type, "token", 0.1, temperature=0.8)
    ref_b = torch.randn(V, generator=torch.Generator().manual_seed(5))
    _parity(
        d,
        init,
        old_per_token_logps=d["old"],
        ref_input=d["ref_h"],
        ref_weight=d["ref_w"],
        ref_bias=ref_b,
    )
    with pytest.warns(UserWarning, match="(?i)using ref_per_token_logps"):
        _parity(d, init, ref_per_token_logps=d["ref"], ref_input=d["ref_h"], ref_weight=d["ref_w"])


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "luspo"])
def test_without_reference_model(loss_type):
    """use_ref_model=False: Liger ignores ref_per_token_logps, the KL and its metric are 0."""
    d = _batch(seed=6)
    init = _init(loss_type, "sequence", 0.04, use_ref_model=False)
    _, metrics, _ = _parity(d, init, ref_per_token_logps=d["ref"], old_per_token_logps=d["old"])
    assert metrics[0] == 0


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "vespo", "sapo"])
def test_ignore_index_labels_on_padding(loss_type):
    """Labels -100 where the mask is 0 (Liger scores them with -logsumexp, then masks them)."""
    d = _batch(seed=7)
    d["y"] = d["y"].masked_fill(d["m"] == 0, -100)
    init = _init(loss_type, "token", 0.04)
    _parity(d, init, ref_per_token_logps=d["ref"], old_per_token_logps=d["old"])


def test_frozen_head_and_bool_mask():
    d = _batch(seed=8, with_bias=True)
    h, w, b = d["h"].clone().requires_grad_(), d["w"], d["b"]
    args = (h, w, d["y"], d["m"].bool(), d["adv"])
    kw = dict(bias=b, old_per_token_logps=d["old"])
    got = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False)(*args, **kw)
    want = Liger(beta=0.0, compiled=False, use_ref_model=False)(*args, **kw)
    torch.testing.assert_close(got[0], want[0], **TOL)
    (g,) = torch.autograd.grad(got[0], [h])
    (gw,) = torch.autograd.grad(want[0], [h])
    torch.testing.assert_close(g, gw, **TOL)


def _dist_worker(rank, world, init_file):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        d = _batch(seed=10 + rank)
        if rank == 1:
            d["m"][0, 5:] = 0  # the ranks hold different token counts
        for loss_type in ("dapo", "cispo", "vespo"):
            for items in (None, 31):  # None: the token count all-reduced over the group
                init = _init(loss_type, "token", 0.04)
                _parity(
                    d,
                    init,
                    ref_per_token_logps=d["ref"],
                    old_per_token_logps=d["old"],
                    num_items_in_batch=items,
                )
    finally:
        dist.destroy_process_group()


def test_dapo_normalizer_over_a_process_group():
    """Two gloo ranks: the dapo / cispo / vespo divisor is num_items_in_batch / world size, or
    the token count all-reduced over the ranks / world size, as Liger's."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_dist_worker, args=(2, os.path.join(tmp, "init")), nprocs=2)


def test_same_interface():
    for fn in ("__init__", "forward"):
        ours = inspect.signature(getattr(LigerFusedLinearGRPOLoss, fn)).parameters
        theirs = inspect.signature(getattr(Liger, fn)).parameters
        assert [(p.name, p.default, p.kind) for p in ours.values()] == [
            (p.name, p.default, p.kind) for p in theirs.values()
        ]
    ours, theirs = LigerFusedLinearGRPOLoss(), Liger()
    for name in inspect.signature(Liger.__init__).parameters:
        if name != "self":
            assert getattr(ours, name) == getattr(theirs, name), name


def test_errors_where_liger_computes_garbage_or_we_cannot():
    """Inputs Liger takes but mis-handles, and the two cases the op does not support, raise our
    own errors naming the class (what Liger refuses: test_refused_inputs_raise_liger_own_errors)."""
    d = _batch()
    args = (d["h"], d["w"], d["y"], d["m"], d["adv"])
    with pytest.raises(ValueError, match="use_ref_model=True needs"):
        LigerFusedLinearGRPOLoss()(*args)
    with pytest.raises(NotImplementedError, match="delta"):
        LigerFusedLinearGRPOLoss(delta=1.1, epsilon_high=0.28, use_ref_model=False)(*args)
    with pytest.raises(ValueError, match="advantages must be"):
        LigerFusedLinearGRPOLoss(use_ref_model=False)(*args[:4], d["adv"][:, None].expand(B, T))
    with pytest.raises(NotImplementedError, match="attention_mask"):
        LigerFusedLinearGRPOLoss(use_ref_model=False)(*args[:3], d["m"] * 0.5, d["adv"])
    bad = d["y"].clone()
    bad[0, 0] = V
    with pytest.raises(ValueError, match="selected_token_ids"):
        LigerFusedLinearGRPOLoss(use_ref_model=False)(d["h"], d["w"], bad, d["m"], d["adv"])
    with pytest.raises(ValueError, match="vllm_is_ratio"):
        LigerFusedLinearGRPOLoss(use_ref_model=False)(*args, vllm_is_ratio=d["vllm"][:, :2])
    # vespo: row 0 spreads 9 columns of clamped log 20 over its 7 tokens, > 20 each
    with pytest.raises(NotImplementedError, match="vespo"):
        LigerFusedLinearGRPOLoss(loss_type="vespo", use_ref_model=False)(
            *args, vllm_is_ratio=torch.full((B, T), 1e9)
        )


def test_patch_installs_the_class_where_liger_and_trl_modules_bind_it():
    """TRL 1.16's GRPOTrainer builds no Liger loss (use_liger_kernel only swaps layer kernels),
    so patch() replaces the class in liger_kernel's modules and in every trl module that bound it
    by name (TRL <= 0.2x's ``from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss``)."""
    import liger_kernel.chunked_loss as chunked

    assert "LigerFusedLinearGRPOLoss" not in inspect.getsource(grpo_trainer)
    user = types.ModuleType("trl._ppk_liger_user")  # a trainer module that imported it by name
    user.LigerFusedLinearGRPOLoss = Liger
    sys.modules[user.__name__] = user
    try:
        ct.patch()
        try:
            for mod in (liger_grpo, chunked, user):
                assert mod.LigerFusedLinearGRPOLoss is LigerFusedLinearGRPOLoss
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss as late

            assert late is LigerFusedLinearGRPOLoss
            assert ct.LigerFusedLinearGRPOLoss is LigerFusedLinearGRPOLoss  # re-exported
        finally:
            ct.unpatch()
        for mod in (liger_grpo, chunked, user):
            assert mod.LigerFusedLinearGRPOLoss is Liger
    finally:
        del sys.modules[user.__name__]


# --------------------------------------------- the Function and the functional, Liger's errors
LigerFunction = liger_grpo.LigerFusedLinearGRPOFunction


def _apply(apply, d, **kw):
    """``apply`` (a Function's, or a functional) the way Liger's module calls it: positionally,
    with every argument after the tensors in Liger's order (``kw`` overrides the defaults)."""
    args = dict(inspect.signature(trl_liger.LigerFusedLinearGRPOFunction.apply).parameters)
    leaves = [d["h"].clone().requires_grad_(), d["w"].clone().requires_grad_()]
    values = dict(
        _input=leaves[0],
        weight=leaves[1],
        selected_token_ids=d["y"],
        attention_mask=d["m"],
        advantages=d["adv"],
        compiled=False,
    )
    values |= kw
    call = [values.get(k, p.default) for k, p in args.items()]
    loss, metrics = apply(*call)
    return loss, metrics, torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize(
    ("loss_type", "level"), [("dapo", "token"), ("sapo", "token"), ("grpo", "sequence")]
)
def test_function_and_functional_match_liger(loss_type, level):
    """``LigerFusedLinearGRPOFunction.apply`` and ``liger_fused_linear_grpo`` give Liger's loss,
    metrics and gradients."""
    from liger_kernel.chunked_loss.functional import liger_fused_linear_grpo as liger_functional

    d = _batch(seed=3)
    kw = dict(
        _init(loss_type, level, 0.04),
        ref_per_token_logps=d["ref"],
        old_per_token_logps=d["old"],
    )
    want = _apply(LigerFunction.apply, d, **kw)
    for apply in (trl_liger.LigerFusedLinearGRPOFunction.apply, trl_liger.liger_fused_linear_grpo):
        got = _apply(apply, d, **kw)
        torch.testing.assert_close(got[0], want[0], **TOL, msg="loss")
        for a, x in zip(got[1], want[1], strict=True):
            torch.testing.assert_close(a.float(), x.float(), **TOL)
        for a, x in zip(got[2], want[2], strict=True):
            torch.testing.assert_close(a, x, **TOL)
    assert liger_functional == LigerFunction.apply  # the functional is the Function's apply


REFUSED = [
    dict(loss_type="foo"),
    dict(importance_sampling_level="seq"),
    dict(importance_sampling_level="sequence", loss_type="cispo"),
    dict(importance_sampling_level="sequence", loss_type="sapo"),
    dict(importance_sampling_level="sequence", loss_type="vespo"),
    dict(loss_type="dr_grpo", max_completion_length=None),
    dict(sapo_temperature_pos=0.0),
    dict(sapo_temperature_neg=-1.0),
    dict(delta=0.0),
    dict(loss_type="sapo", sapo_temperature_neg=0.0),
]


@pytest.mark.parametrize("bad", REFUSED, ids=lambda b: "-".join(f"{k}={v}" for k, v in b.items()))
def test_refused_inputs_raise_liger_own_errors(bad):
    """What Liger refuses raises Liger's exception type and message, from the module and from
    the Function, whichever check of Liger's comes first."""
    d = _batch(seed=4)
    init = dict(_init("dapo", "token", 0.04), **bad)
    call = dict(ref_per_token_logps=d["ref"])

    for ours, theirs in ((LigerFusedLinearGRPOLoss, Liger),):
        want = _error(lambda cls=theirs: _run(cls, d, init, **call))
        assert _error(lambda cls=ours: _run(cls, d, init, **call)) == want
    kw = dict(init, ref_per_token_logps=d["ref"])
    try:  # Liger's Function skips the module's constructor checks: it may accept the input
        want = _apply(LigerFunction.apply, d, **kw)
    except Exception as e:
        want = (type(e), str(e))
        assert _error(lambda: _apply(trl_liger.LigerFusedLinearGRPOFunction.apply, d, **kw)) == want
    else:
        ours = trl_liger.LigerFusedLinearGRPOFunction.apply
        if "delta" in bad:  # delta < 1 + epsilon_high: unsupported, documented (module docstring)
            with pytest.raises(NotImplementedError, match="delta = 0.0 below 1 \\+ epsilon_high"):
                _apply(ours, d, **kw)
            return
        torch.testing.assert_close(_apply(ours, d, **kw)[0], want[0], **TOL)


def test_patch_installs_the_function_and_the_functional():
    import liger_kernel.chunked_loss.functional as functional

    ct.patch()
    try:
        assert liger_grpo.LigerFusedLinearGRPOFunction is trl_liger.LigerFusedLinearGRPOFunction
        assert functional.liger_fused_linear_grpo is trl_liger.liger_fused_linear_grpo
    finally:
        ct.unpatch()
    assert liger_grpo.LigerFusedLinearGRPOFunction is LigerFunction
    assert functional.liger_fused_linear_grpo == LigerFunction.apply
