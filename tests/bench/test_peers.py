"""The competition's functions as the benchmark suite calls them (ppokernels/bench/peers.py and
the providers of bench_token_logprobs / bench_linear_logprobs) compute what ppokernels computes:
log-probs
and entropy within fp32 rounding of the fp64 reference, gradients included, so the benchmark
compares like with like. A peer that needs a GPU skips with "needs a CUDA GPU"; a missing package
skips with the import error (a failure in CI, tests/conftest.py)."""

import pytest
import torch

from ppokernels import reference
from ppokernels.bench import peers
from ppokernels.bench.suite import bench_linear_logprobs as bll
from ppokernels.bench.suite import bench_token_logprobs as blp

TOL = {"atol": 2e-5, "rtol": 2e-5}


def _require(*names):
    for name in names:
        try:
            peers.peer(name)
        except peers.PeerUnavailable as e:
            pytest.skip(str(e))


@pytest.mark.parametrize(
    ("provider", "with_entropy"),
    [(p, e) for p, (_, ent) in sorted(blp.PEER_FNS.items()) for e in (False, True) if ent or not e],
)
def test_logits_peers_match_the_reference(provider, with_entropy):
    lp_name, ent_name = blp.PEER_FNS[provider]
    _require(lp_name, *([ent_name] if with_entropy else []))
    logits = (torch.randn(6, 1271, dtype=torch.float64) * 3).float().requires_grad_(True)
    labels = torch.randint(0, 1271, (6,))
    lp, ent = blp._fn(provider, with_entropy)(logits, labels)
    ref = reference.token_logprobs(logits.detach().double(), labels, with_entropy=with_entropy)
    torch.testing.assert_close(lp.double(), ref[0], **TOL)
    if with_entropy:
        torch.testing.assert_close(ent.double(), ref[1], **TOL)
    (g,) = torch.autograd.grad(lp.sum(), logits)
    z = logits.detach().double().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(reference.token_logprobs(z, labels)[0].sum(), z)
    torch.testing.assert_close(g.double(), g_ref, **TOL)


def _head_inputs(n=24, h=16, v=301):
    hidden = torch.randn(n, h, dtype=torch.float64).float().requires_grad_(True)
    weight = (torch.randn(v, h, dtype=torch.float64) / h**0.5).float().requires_grad_(True)
    return hidden, weight, torch.randint(0, v, (n,))


@pytest.mark.parametrize(
    ("provider", "with_entropy"),
    [
        (p, e)
        for p in sorted(set(bll.PEER_PROVIDERS) - {"liger-grpo"})
        for e in (False, True)
        if not (e and p in bll.NO_ENTROPY)
    ],
)
def test_fused_head_peers_match_the_naive_path(provider, with_entropy):
    _require(*bll.PEER_PROVIDERS[provider])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hidden, weight, labels = (t.to(device) for t in _head_inputs())
    lp, ent = bll._fn(provider, device, with_entropy)(hidden, weight, labels)
    h64, w64 = (t.detach().double().requires_grad_(True) for t in (hidden, weight))
    lp_ref, ent_ref = bll.naive(h64, w64, labels, True)
    torch.testing.assert_close(lp.double(), lp_ref, **TOL)
    if with_entropy:
        torch.testing.assert_close(ent.double(), ent_ref, **TOL)
    grads = torch.autograd.grad(lp.sum(), (hidden, weight))
    grads_ref = torch.autograd.grad(lp_ref.sum(), (h64, w64))
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g.double(), g_ref, **TOL)


def test_liger_grpo_is_the_on_policy_grpo_loss():
    """beta = 0 and no old log-probs: the ratio is exp(lp - lp.detach()) = 1, so the loss is
    -mean over tokens of the sequence's advantage, and its gradient that of -mean(adv * lp)."""
    _require("liger-grpo")
    hidden, weight, labels = _head_inputs(n=2 * bll.SEQ_LEN, h=8, v=97)
    loss, _ = bll._fn("liger-grpo", "cpu", False)(hidden, weight, labels)
    adv_tok = torch.linspace(-1, 1, 2, dtype=torch.float64).repeat_interleave(bll.SEQ_LEN)
    torch.testing.assert_close(loss.double(), -adv_tok.mean(), **TOL)
    h64, w64 = (t.detach().double().requires_grad_(True) for t in (hidden, weight))
    lp_ref, _ = bll.naive(h64, w64, labels, False)
    grads = torch.autograd.grad(loss, (hidden, weight))
    grads_ref = torch.autograd.grad(-(adv_tok * lp_ref).mean(), (h64, w64))
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g.double(), g_ref, atol=1e-6, rtol=1e-4)
