"""Edge cases that once gave wrong gradients or NaN: one valid entry, aliasing (overlapping)
logits, empty batches, veRL's token-sum with a tensor count and loose argument types. Each case
runs on every backend built here and is checked against the reference or against a value written
out from the formula. (NaN at masked positions: the all-masked block of the conformance harness,
ppokernels.testing, in each op's test file.)"""

import pytest
import torch

import ppokernels
from ppokernels.losses import AGG_MODES
from ppokernels.testing import backend_params

PARAMS = backend_params()
KERNELS = [p for p in PARAMS if p[1] != "reference"]


def _grad(fn, x):
    x = x.detach().clone().requires_grad_(True)
    fn(x).backward()
    return x.grad


# ------------------------------------------------------------------------ masked statistics
@pytest.mark.parametrize("device, backend", PARAMS)
def test_masked_mean_one_valid_entry(device, backend):
    """d mean / dx of a single valid entry is [1, 0, 0] (the unused variance must not be 0 / 0)."""
    x = torch.tensor([1.0, 2.0, 3.0], device=device)
    mask = torch.tensor([1, 0, 0], device=device)
    g = _grad(lambda t: ppokernels.masked_mean(t, mask, backend=backend), x)
    torch.testing.assert_close(g.cpu(), torch.tensor([1.0, 0.0, 0.0]))


@pytest.mark.parametrize("device, backend", PARAMS)
def test_masked_var_one_valid_entry_is_nan_without_nan_gradient(device, backend):
    """The unbiased variance of one entry is undefined (NaN, a constant): its gradient is 0."""
    x = torch.tensor([1.0, 2.0, 3.0], device=device)
    mask = torch.tensor([0, 1, 0], device=device)
    assert torch.isnan(ppokernels.masked_var(x, mask, backend=backend))
    g = _grad(lambda t: ppokernels.masked_var(t, mask, backend=backend), x)
    torch.testing.assert_close(g.cpu(), torch.zeros(3))


# --------------------------------------------------------------------------------- logprobs
@pytest.mark.parametrize("device, backend", KERNELS)
def test_inplace_backward_on_expanded_logits(device, backend):
    """Stride-0 logits cannot hold their own gradient: the backward uses a new buffer."""
    base = torch.randn(1, 7, dtype=torch.float64, device=device)
    labels = torch.tensor([0, 3, 6], device=device)

    def run(inplace):
        logits = base.clone().requires_grad_(True)
        lp, _ = ppokernels.token_logprobs(
            logits.expand(3, 7), labels, inplace_backward=inplace, backend=backend
        )
        lp.sum().backward()
        return logits.grad

    torch.testing.assert_close(run(True), run(False))


@pytest.mark.parametrize("device, backend", PARAMS)
def test_linear_logprobs_with_masked_vocabulary_entries(device, backend):
    """-inf in the bias masks a vocabulary entry: finite entropy and gradients, equal to
    token_logprobs (fp64 reference) of the same logits."""
    torch.manual_seed(3)
    h = torch.randn(6, 8, dtype=torch.float64, device=device)
    w = torch.randn(37, 8, dtype=torch.float64, device=device)
    bias = torch.randn(37, dtype=torch.float64, device=device)
    bias[[0, 5, 20, 36]] = float("-inf")
    labels = torch.tensor([1, 2, 3, 4, 6, 7], device=device)
    args = [t.clone().requires_grad_(True) for t in (h, w)]
    lp, ent = ppokernels.linear_logprobs(
        *args, labels, bias=bias, with_entropy=True, backend=backend
    )
    logits = (h @ w.T + bias).requires_grad_(True)
    want_lp, want_ent = ppokernels.token_logprobs(
        logits, labels, with_entropy=True, backend="reference"
    )
    torch.testing.assert_close(lp, want_lp)
    torch.testing.assert_close(ent, want_ent)
    (lp.sum() + ent.sum()).backward()
    (want_lp.sum() + want_ent.sum()).backward()
    torch.testing.assert_close(args[0].grad, logits.grad @ w)
    torch.testing.assert_close(args[1].grad, logits.grad.T @ h)


@pytest.mark.parametrize("device, backend", PARAMS)
def test_flags_must_be_bools(device, backend):
    logits = torch.randn(2, 5, device=device)
    labels = torch.tensor([1, 2], device=device)
    with pytest.raises(TypeError, match="token_logprobs: with_entropy must be a bool"):
        ppokernels.token_logprobs(logits, labels, with_entropy="no", backend=backend)
    with pytest.raises(TypeError, match="token_logprobs: inplace_backward must be a bool"):
        ppokernels.token_logprobs(logits, labels, inplace_backward=1, backend=backend)
    w = torch.randn(5, 4, device=device)
    h = torch.randn(2, 4, device=device)
    with pytest.raises(TypeError, match="linear_logprobs: with_entropy must be a bool"):
        ppokernels.linear_logprobs(h, w, labels, with_entropy="no", backend=backend)
    with pytest.raises(TypeError, match="linear_logprobs: ignore_index must be an int"):
        ppokernels.linear_logprobs(h, w, labels, ignore_index=True, backend=backend)
    with pytest.raises(TypeError, match="linear_logprobs: chunk_size must be an int"):
        ppokernels.linear_logprobs(h, w, labels, chunk_size=True, backend=backend)
    with pytest.raises(ValueError, match="linear_logprobs: hidden has H = 0"):
        ppokernels.linear_logprobs(h[:, :0], w[:, :0], labels, backend=backend)


# ------------------------------------------------------------------------------- ppo losses
@pytest.mark.parametrize("device, backend", PARAMS)
@pytest.mark.parametrize("agg", AGG_MODES)
def test_losses_of_an_empty_horizon_are_zero(device, backend, agg):
    """T = 0: no token, loss 0 (not 0 / 0) on every backend."""
    z = torch.zeros(3, 0, device=device)
    out = ppokernels.ppo_policy_loss(z, z, z, z.bool(), agg=agg, backend=backend)
    assert out.loss.item() == 0.0
    vout = ppokernels.value_loss(z, z, z, z.bool(), clip=0.2, agg=agg, backend=backend)
    assert vout.loss.item() == 0.0


# ------------------------------------------------------------------------------ compat.verl
@pytest.mark.parametrize("count", [7, 7.0, torch.tensor(7.0), torch.tensor(7)])
@pytest.mark.parametrize("mode", AGG_MODES)
def test_verl_agg_loss_with_every_type_of_count(mode, count):
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
    from ppokernels.compat import verl as ppk_verl

    torch.manual_seed(1)
    loss_mat = torch.randn(3, 5)
    mask = (torch.rand(3, 5) < 0.6).float()
    mask[0, 0] = 1
    kw = dict(dp_size=2, batch_num_tokens=count, global_batch_size=count)
    want = core_algos.agg_loss(loss_mat, mask, mode, **kw)
    got = ppk_verl.agg_loss(loss_mat, mask, mode, **kw)
    torch.testing.assert_close(torch.as_tensor(got).float(), torch.as_tensor(want).float())


@pytest.mark.parametrize("device, backend", PARAMS)
@pytest.mark.parametrize("value", [0.5, 2.0, -1.0, float("nan")])
def test_non_binary_masks_are_refused(device, backend, value):
    x = torch.randn(2, 4, device=device)
    mask = torch.ones(2, 4, device=device)
    mask[1, 2] = value
    for call in (
        lambda: ppokernels.masked_mean(x, mask, backend=backend),
        lambda: ppokernels.masked_whiten(x, mask, backend=backend),
        lambda: ppokernels.gae(x, x, mask, backend=backend),
        lambda: ppokernels.ppo_policy_loss(x, x, x, mask, backend=backend),
    ):
        with pytest.raises(ValueError, match="must hold only 0 and 1"):
            call()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # inf - inf in the Triton interpreter
@pytest.mark.parametrize("device, backend", PARAMS)
def test_plus_inf_logit_gives_nan_rows(device, backend):
    """A +inf logit leaves the softmax undefined: NaN log-probs (every label) and entropy for
    that row on every backend, as torch.log_softmax; other rows are unaffected."""
    logits = torch.randn(3, 37, dtype=torch.float64, device=device)
    logits[0, 5] = float("inf")
    logits[2, 0] = float("inf")
    labels = torch.tensor([5, 3, 1], device=device)
    lp, ent = ppokernels.token_logprobs(logits, labels, with_entropy=True, backend=backend)
    want = torch.log_softmax(logits, -1).gather(1, labels[:, None]).squeeze(1)
    assert torch.isnan(lp[[0, 2]]).all() and torch.isnan(ent[[0, 2]]).all()
    torch.testing.assert_close(lp[1], want[1])


def test_meta_tensors_are_refused_by_name():
    """Every public op names itself (not an internal op) and says meta tensors are unsupported."""
    x = torch.empty(2, 5, device="meta")
    y = torch.zeros(2, dtype=torch.int64, device="meta")
    m = torch.ones(2, 5, dtype=torch.bool, device="meta")
    calls = {
        "token_logprobs": lambda: ppokernels.token_logprobs(x, y),
        "linear_logprobs": lambda: ppokernels.linear_logprobs(x, x, y),
        "kl_penalty": lambda: ppokernels.kl_penalty(x, x),
        "masked_mean": lambda: ppokernels.masked_mean(x, m),
        "masked_var": lambda: ppokernels.masked_var(x, m),
        "masked_whiten": lambda: ppokernels.masked_whiten(x, m),
        "gae": lambda: ppokernels.gae(x, x, m),
        "discounted_returns": lambda: ppokernels.discounted_returns(x, m),
        "group_advantages": lambda: ppokernels.group_advantages(x[:, 0], y),
        "ppo_policy_loss": lambda: ppokernels.ppo_policy_loss(x, x, x, m),
        "value_loss": lambda: ppokernels.value_loss(x, x, x, m),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=f"^{name}: .* meta tensors are not supported"):
            call()
