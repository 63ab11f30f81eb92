"""Parity of ppokernels.compat.trl with the released trl 1.16.0 (pip install --no-deps): the
log-prob helpers of trl.trainer.utils, the fused LM head's ChunkedLogProbFunction, and the loss
``GRPOTrainer._compute_loss`` returns (called on the real method with a minimal trainer object)."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from ._compat_data import close as _close
from ._compat_data import error as _error

trl_utils = pytest.importorskip("trl.trainer.utils")  # the reason names the import error
grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer")


import ppokernels.compat.trl as ct  # noqa: E402


def _logits(B=3, T=5, V=1271, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, V, generator=g) * 3, torch.randint(0, V, (B, T), generator=g)


def _run(fn, x, seed=1):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    out = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(seed)
    total = sum((o * torch.randn(o.shape, generator=g)).sum() for o in out)
    return out, torch.autograd.grad(total, [x])[0]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("row_mask", [False, True])
@pytest.mark.parametrize("topk", [None, 4])
def test_selective_log_softmax(temperature, row_mask, topk):
    logits, index = _logits()
    if topk is not None:
        index = torch.randint(
            0, logits.shape[-1], (*index.shape, topk), generator=torch.Generator().manual_seed(3)
        )
    rm = (
        (torch.rand(index.shape, generator=torch.Generator().manual_seed(2)) > 0.3).long()
        if row_mask
        else None
    )
    ow, gw = _run(lambda z: trl_utils.selective_log_softmax(z, index, temperature, rm), logits)
    oo, go = _run(lambda z: ct.selective_log_softmax(z, index, temperature, rm), logits)
    _close(oo[0], ow[0])
    _close(go, gw)
    with pytest.raises(ValueError):
        ct.selective_log_softmax(logits, index, 0.0)


@pytest.mark.parametrize("requires_grad", [True, False])
def test_entropy_and_joint(requires_grad):
    logits, index = _logits(seed=4)
    ow, gw = _run(lambda z: trl_utils.entropy_from_logits(z, chunk_size=2), logits)
    oo, go = _run(lambda z: ct.entropy_from_logits(z, chunk_size=2), logits)
    _close(oo[0], ow[0])
    _close(go, gw)
    rm = torch.ones_like(index)
    rm[0, 1:] = 0

    def joint(mod):
        return lambda z: mod.selective_log_softmax_and_entropy(z, index, requires_grad, 0.8, rm)

    ow, gw = _run(joint(trl_utils), logits)
    oo, go = _run(joint(ct), logits)
    for w, o in zip(ow, oo, strict=True):
        _close(o, w)
    _close(go, gw)


needs_linear = pytest.mark.skipif(
    not hasattr(ct.ppk, "linear_logprobs"), reason="ppokernels.linear_logprobs has not landed yet"
)


@needs_linear
@pytest.mark.parametrize("bias,scale", [(False, 1.0), (True, 0.5)])
@pytest.mark.parametrize("outputs", [("log_probs",), ("log_probs", "entropy")])
def test_chunked_logprob_function(bias, scale, outputs):
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    g = torch.Generator().manual_seed(5)
    N, H, V = 9, 32, 1271
    h, w = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g) * 0.3
    b = torch.randn(V, generator=g) if bias else None
    y = torch.randint(0, V, (N,), generator=g)

    def run(fn):
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        out = fn.apply(hh, ww, b, y, 0.9, 256, None, scale, outputs)
        gg = torch.Generator().manual_seed(6)
        total = sum(
            (o * torch.randn(o.shape, generator=gg)).sum() for o in out[:2] if o is not None
        )
        return out, torch.autograd.grad(total, [hh, ww])

    ow, gw = run(ChunkedLogProbFunction)
    oo, go = run(ct.ChunkedLogProbFunction)
    for a, e in zip(oo, ow, strict=True):
        assert (a is None) == (e is None)
        if a is not None:
            _close(a, e, atol=1e-4, rtol=1e-4)
    for a, e in zip(go, gw, strict=True):
        _close(a, e, atol=1e-4, rtol=1e-4)


@needs_linear
def test_chunked_logprob_function_rounds_like_trl_when_asked():
    """bf16 weights: the default keeps the logits in fp32 (closer to fp64 than TRL); with
    patch(round_logits=True) the logits are rounded to bf16 first and the forward agrees with
    TRL's own function."""
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    g = torch.Generator().manual_seed(5)
    N, H, V = 40, 128, 2053
    h = torch.randn(N, H, generator=g).bfloat16()
    w = (torch.randn(V, H, generator=g) * 0.3).bfloat16()
    b = torch.randn(V, generator=g).bfloat16()
    y = torch.randint(0, V, (N,), generator=g)
    outputs = ("log_probs", "entropy")

    def run(fn, *args):
        return [o.double() for o in fn.apply(*args, b, y, 0.9, 512, None, 1.0, outputs)[:2]]

    exact = run(ChunkedLogProbFunction, h.double(), w.double())
    trl = run(ChunkedLogProbFunction, h, w)
    try:
        ct._ROUND_LOGITS[0] = False
        ours = run(ct.ChunkedLogProbFunction, h, w)
        ct._ROUND_LOGITS[0] = True
        rounded = run(ct.ChunkedLogProbFunction, h, w)
    finally:
        ct._ROUND_LOGITS[0] = False
    for i in range(2):
        err = [(a[i] - exact[i]).abs().max().item() for a in (ours, trl)]
        assert err[0] < 0.01 * err[1]  # fp32 logits: far closer to the exact values
        _close(rounded[i], trl[i], atol=1e-5, rtol=1e-5)  # TRL's rounding reproduced
    with pytest.raises(TypeError, match="round_logits must be a bool"):
        ct.patch(round_logits="yes")


# ------------------------------------------------------------------------------ GRPO loss


def _mask(B=6, T=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    m = (torch.arange(T)[None] < lengths[:, None]).long()
    tool = (torch.rand(B, T, generator=g) > 0.2).long()  # multi-turn tool tokens: holes
    return m, tool


SAPO_VESPO = dict(
    sapo_temperature_pos=1.0,
    sapo_temperature_neg=1.05,
    vespo_k_pos=2.0,
    vespo_lambda_pos=3.0,
    vespo_k_neg=3.0,
    vespo_lambda_neg=2.0,
)


def _trainer(
    loss_type,
    lp,
    eps_low,
    eps_high,
    level,
    delta,
    beta,
    bias_kl,
    G,
    S,
    P,
    training,
    vllm=False,
    **args,
):
    trainer = SimpleNamespace(
        loss_type=loss_type,
        epsilon_low=eps_low,
        epsilon_high=eps_high,
        beta=beta,
        importance_sampling_level=level,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        use_vllm=vllm,
        vllm_importance_sampling_correction=vllm,
        max_completion_length=lp.shape[1] + 3,
        current_gradient_accumulation_steps=G,
        aux_loss_enabled=False,
        _entropy_bonus_enabled=False,
        model=SimpleNamespace(training=training),
        args=SimpleNamespace(
            delta=delta,
            use_bias_correction_kl=bias_kl,
            steps_per_generation=S,
            **{**SAPO_VESPO, **args},
        ),
        accelerator=SimpleNamespace(
            num_processes=P, reduce=lambda t, reduction: t, gather=lambda t: t
        ),
        _metrics=defaultdict(lambda: defaultdict(list)),
    )
    trainer.get_gamma_weights = grpo_trainer.GRPOTrainer.get_gamma_weights  # a staticmethod
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (
        trainer.lp,
        torch.zeros_like(trainer.lp),
        None,
    )
    return trainer


@pytest.mark.parametrize("loss_type", ct.LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize(
    "clip",
    [(0.2, 0.2, None, 0.0, False), (0.2, 0.28, 2.0, 0.04, False), (0.1, 0.3, None, 0.05, True)],
)
@pytest.mark.parametrize("training", [True, False])
def test_grpo_loss(loss_type, level, clip, training):
    eps_low, eps_high, delta, beta, bias_kl = clip
    if loss_type == "cispo":
        eps_high += 1.0  # TRL's cispo caps the ratio at epsilon_high itself
    _grpo_parity(loss_type, level, eps_low, eps_high, delta, beta, bias_kl, training)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "cispo", "sapo", "vespo"])
@pytest.mark.parametrize(
    "args",
    [
        {},
        dict(
            sapo_temperature_pos=2.0,
            sapo_temperature_neg=0.5,
            vespo_k_pos=1.5,
            vespo_lambda_neg=0.7,
        ),
    ],
)
def test_grpo_loss_vllm_is(loss_type, args):
    """vLLM importance-sampling correction: scales the token loss, or (vespo) enters phi."""
    _grpo_parity(loss_type, "token", 0.2, 1.2, None, 0.04, False, True, vllm=True, **args)


def _grpo_parity(
    loss_type, level, eps_low, eps_high, delta, beta, bias_kl, training, vllm=False, **args
):
    B, T = 6, 11
    g = torch.Generator().manual_seed(7)
    completion_mask, tool_mask = _mask(B, T)
    old = torch.randn(B, T, generator=g) - 2
    lp = old + 0.3 * torch.randn(B, T, generator=g)
    ref = old + 0.3 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    inputs = dict(
        prompt_ids=torch.zeros(B, 2, dtype=torch.long),
        prompt_mask=torch.ones(B, 2, dtype=torch.long),
        completion_ids=torch.zeros(B, T, dtype=torch.long),
        completion_mask=completion_mask,
        tool_mask=tool_mask,
        advantages=adv,
        old_per_token_logps=old,
        ref_per_token_logps=ref,
        num_items_in_batch=torch.tensor(float(completion_mask.sum() * 3)),
    )
    G, S, P = 2, 4, 3
    is_ratio = None
    if vllm:  # 1 on padding, as TRL's (exp of a masked log-ratio difference)
        m = (completion_mask * tool_mask).bool()
        is_ratio = torch.where(m, torch.rand(B, T, generator=g) + 0.5, 1.0)
        inputs["importance_sampling_ratio"] = is_ratio
    if loss_type == "cispo" and level == "sequence":
        with pytest.raises(NotImplementedError, match="cispo at importance_sampling_level"):
            ct.grpo_loss(
                lp, old, adv, completion_mask, loss_type="cispo", importance_sampling_level=level
            )
        return

    x = lp.clone().requires_grad_(True)
    trainer = _trainer(
        loss_type,
        lp,
        eps_low,
        eps_high,
        level,
        delta,
        beta,
        bias_kl,
        G,
        S,
        P,
        training,
        vllm,
        **args,
    )
    trainer.lp = x
    want = grpo_trainer.GRPOTrainer._compute_loss(trainer, None, inputs)
    (gw,) = torch.autograd.grad(want, [x])

    y = lp.clone().requires_grad_(True)
    got = ct.grpo_loss(
        y,
        old,
        adv,
        completion_mask * tool_mask,
        loss_type=loss_type,
        epsilon_low=eps_low,
        epsilon_high=eps_high,
        importance_sampling_level=level,
        delta=delta,
        beta=beta,
        ref_per_token_logps=ref,
        use_bias_correction_kl=bias_kl,
        max_completion_length=T + 3,
        num_items_in_batch=inputs["num_items_in_batch"],
        num_processes=P,
        gradient_accumulation_steps=G,
        steps_per_generation=S,
        training=training,
        importance_sampling_ratio=is_ratio,
        **{**SAPO_VESPO, **args},
    )
    (go,) = torch.autograd.grad(got, [y])
    _close(got, want)
    _close(go, gw)


@pytest.mark.parametrize(
    "loss_type, level",
    [("ppo", "token"), ("GRPO", "sequence"), ("grpo", "seq"), ("ppo", "tokens"), ("dapo", None)],
)
def test_grpo_loss_refusals_match_trl(loss_type, level):
    """What TRL's _compute_loss refuses raises its exception type and message, level first."""
    B, T = 3, 5
    lp, mask = torch.randn(B, T), torch.ones(B, T)
    inputs = dict(
        prompt_ids=torch.zeros(B, 2, dtype=torch.long),
        prompt_mask=torch.ones(B, 2, dtype=torch.long),
        completion_ids=torch.zeros(B, T, dtype=torch.long),
        completion_mask=mask,
        advantages=torch.randn(B),
        old_per_token_logps=lp,
        num_items_in_batch=mask.sum(),
    )
    trainer = _trainer(loss_type, lp, 0.2, 0.28, level, None, 0.0, False, 1, 1, 1, True)
    trainer.lp = lp
    want = _error(lambda: grpo_trainer.GRPOTrainer._compute_loss(trainer, None, inputs))
    got = _error(
        lambda: ct.grpo_loss(
            lp, lp, inputs["advantages"], mask, loss_type=loss_type, importance_sampling_level=level
        )
    )
    assert got == want


def test_grpo_loss_refuses_what_it_cannot_compute():
    """TRL computes these; the drop-in says so instead of computing something else."""
    x = torch.zeros(2, 3)
    with pytest.raises(NotImplementedError, match="grpo_loss: delta below 1 \\+ epsilon_high"):
        ct.grpo_loss(x, x, torch.zeros(2), x, delta=1.1, epsilon_high=0.28)
    with pytest.raises(NotImplementedError, match="grpo_loss: cispo at importance_sampling_level"):
        ct.grpo_loss(
            x, x, torch.zeros(2), x, loss_type="cispo", importance_sampling_level="sequence"
        )


def test_patch_unpatch():
    before = (
        trl_utils.selective_log_softmax,
        trl_utils.entropy_from_logits,
        trl_utils._ChunkedLogProbFunction,
    )
    ct.patch()
    try:
        assert trl_utils.selective_log_softmax is ct.selective_log_softmax
        assert trl_utils._ChunkedLogProbFunction is ct.ChunkedLogProbFunction
        import trl.kernels

        assert trl.kernels.ChunkedLogProbFunction is before[2]  # TRL's own stays reachable
    finally:
        ct.unpatch()
    after = (
        trl_utils.selective_log_softmax,
        trl_utils.entropy_from_logits,
        trl_utils._ChunkedLogProbFunction,
    )
    assert all(a is b for a, b in zip(before, after, strict=True))
