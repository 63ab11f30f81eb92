"""linear_ppo_policy_loss against the naive head + loss it replaces: logits = h W^T + b built in
full, torch.log_softmax, the plain-PyTorch reference policy loss (ppokernels.reference), and
autograd through all of it, in float64. Masks are multi-turn with holes, right padding and an
empty row; chunk sizes cut rows into segments (token modes) and force the unfused row path
(sequence modes)."""

import math

import pytest
import torch

import ppokernels
from ppokernels import reference
from ppokernels.losses import AGG_MODES, LOSS_MODES, LOSS_SPECS, SAPO, Clip, loss_spec
from ppokernels.testing import available_backends, backend_params, binary_skip_reason

KERNELS = [p for p in backend_params() if p[1] != "reference"]
# The head under test: the fused op on the C++ kernels. Without the binary (the pure-Python
# install) the comparisons with the naive head check its reference path (HEAD), and the fused op's
# own checks (chunking, stored gradients, opcheck) run on the Triton kernels where they run on CPU
# tensors (FUSED; None: they skip), whose fp32 scalars (tau_neg = 1.05, ...) miss TOL64.
HEAD = "reference" if binary_skip_reason() else "cpp"
FUSED = next((k for k in ("cpp", "triton") if k in available_backends("cpu")), None)
AGGS = AGG_MODES
MODE_FIELDS = {"dro": dict(beta=0.1), "cispo": dict(clip_high=0.3), "dppo_tv": dict(clip_high=0.3)}
SEQUENCE_MODES = [m for m, c in LOSS_SPECS.items() if c.row_level]


def _spec(mode):
    return loss_spec(mode, **MODE_FIELDS.get(mode, {}))


def _batch(B=4, T=37, H=12, V=53, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64) * 0.7
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.7
    bias = torch.randn(V, generator=g, dtype=torch.float64) * 0.3
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 5:9] = False  # a hole (multi-turn: tool output)
    mask[1, 20:] = False  # right padding
    mask[2] = False  # an empty row
    mask[-1, :3] = False
    labels[~mask] = -100
    labels[-1, 10 % T] = -100  # ignore_index inside the mask: not a token either
    old = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.1 - 3.0
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.1 - 3.0
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return dict(
        hidden=cast(hidden),
        weight=cast(weight),
        bias=cast(bias),
        labels=labels.to(device),
        old=cast(old),
        adv=cast(adv),
        ref=cast(ref),
        mask=mask.to(device),
    )


def _naive(b, temperature, with_bias, **kw):
    """The head it replaces, in float64: full logits, log_softmax, the reference loss."""
    h = b["hidden"].detach().double().requires_grad_()
    w = b["weight"].detach().double().requires_grad_()
    bias = b["bias"].detach().double().requires_grad_() if with_bias else None
    z = h @ w.T + (bias if bias is not None else 0.0)
    logp = torch.log_softmax(z / temperature, -1)
    y = b["labels"].clamp(min=0)
    lp = logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    valid = b["mask"] & (b["labels"] != -100)
    lp, ent = torch.where(valid, lp, 0.0), torch.where(valid, ent, 0.0)
    out = reference.ppo_policy_loss(
        lp, b["old"].double(), b["adv"].double(), valid, entropy=ent, **kw
    )
    leaves = [t for t in (h, w, bias) if t is not None]
    return out, torch.autograd.grad(out.loss, leaves)


def _fused(b, temperature, with_bias, backend, chunk_size, **kw):
    leaves = [b["hidden"].detach().requires_grad_(), b["weight"].detach().requires_grad_()]
    bias = b["bias"].detach().requires_grad_() if with_bias else None
    out = ppokernels.linear_ppo_policy_loss(
        leaves[0],
        leaves[1],
        b["labels"],
        b["old"],
        b["adv"],
        b["mask"],
        bias=bias,
        temperature=temperature,
        with_entropy=True,
        chunk_size=chunk_size,
        backend=backend,
        **kw,
    )
    leaves += [bias] if with_bias else []
    return out, torch.autograd.grad(out.loss, leaves)


def _assert_same(got, want, tol):
    (o, g), (e, ge) = got, want
    for name in ("loss", "clipfrac", "approx_kl", "dual_clipfrac", "kl", "entropy"):
        a, x = getattr(o, name), getattr(e, name)
        assert (a is None) == (x is None), name
        if a is not None:
            torch.testing.assert_close(a.double(), x.double(), **tol, msg=name)
    for a, x in zip(g, ge, strict=True):
        torch.testing.assert_close(a.double(), x, **tol)


TOL64 = dict(rtol=1e-9, atol=1e-11)


def _fused_backend() -> str:
    """FUSED, or skip: without the binary and Triton on CPU the fused op has no kernels here."""
    if FUSED is None:
        pytest.skip(binary_skip_reason())
    return FUSED


@pytest.mark.parametrize("mode", LOSS_MODES)
@pytest.mark.parametrize("chunk", [16, 64, None])  # 16: rows cut (or unfused), 64: whole rows
def test_every_mode_matches_naive_head(mode, chunk):
    b = _batch()
    kw = dict(loss=_spec(mode))
    got = _fused(b, 0.8, True, HEAD, chunk, **kw)
    _assert_same(got, _naive(b, 0.8, True, **kw), TOL64)


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("mode", ["vanilla", "gspo", "cispo"])
def test_every_aggregation_and_global_normalisers(agg, mode):
    b = _batch(seed=1)
    for extra in ({}, dict(num_tokens=50.0, num_seqs=7.0)):
        kw = dict(loss=_spec(mode), agg=agg, **extra)
        _assert_same(_fused(b, 1.0, False, HEAD, 16, **kw), _naive(b, 1.0, False, **kw), TOL64)


def test_kl_entropy_dual_clip_is_weights_and_row_advantages():
    b = _batch(seed=2)
    isw = torch.rand(4, 37, dtype=torch.float64) + 0.5  # a constant
    for adv_rows in (False, True):
        if adv_rows:
            b["adv"] = b["adv"][:, 0].contiguous()
        kw = dict(
            ref_logprobs=b["ref"],
            kl_coef=0.05,
            kl_estimator="k3",
            entropy_coef=0.01,
            loss=Clip(0.2, 0.28, dual_clip=3.0),
            is_weights=isw,
            agg="seq-mean-token-mean",
        )
        _assert_same(_fused(b, 0.7, True, HEAD, 16, **kw), _naive(b, 0.7, True, **kw), TOL64)


@pytest.mark.parametrize(("device", "backend"), KERNELS)
def test_float32_kernels(device, backend):
    b = _batch(B=4, T=21, H=16, V=97, dtype=torch.float32, device=device, seed=3)
    kw = dict(loss=Clip(), ref_logprobs=b["ref"], kl_coef=0.1, entropy_coef=0.02)
    tol = dict(rtol=2e-4, atol=2e-5)
    got = _fused(b, 0.9, True, backend, 16, **kw)
    _assert_same(got, _naive(b, 0.9, True, **kw), tol)


def test_sequence_modes_take_the_unfused_path_only_for_long_rows():
    backend = _fused_backend()
    b = _batch(seed=4)
    for mode in SEQUENCE_MODES:
        whole = _fused(b, 1.0, False, backend, 64, loss=mode)
        split = _fused(b, 1.0, False, backend, 16, loss=mode)
        _assert_same(split, (whole[0], [g.double() for g in whole[1]]), TOL64)


def test_backward_scales_the_stored_gradients():
    backend = _fused_backend()
    b = _batch(seed=5)
    h = b["hidden"].detach().requires_grad_()
    out = ppokernels.linear_ppo_policy_loss(
        h, b["weight"], b["labels"], b["old"], b["adv"], b["mask"], chunk_size=16, backend=backend
    )
    (g3,) = torch.autograd.grad(-3.0 * out.loss, h, retain_graph=True)
    (g1,) = torch.autograd.grad(out.loss, h, retain_graph=True)  # hands the stored ones over
    torch.testing.assert_close(g3, -3.0 * g1, rtol=1e-12, atol=0)
    assert (g1[~(b["mask"] & (b["labels"] != -100))] == 0).all()  # no gradient off the tokens
    (again,) = torch.autograd.grad(out.loss, h)  # the head runs again for a later backward
    torch.testing.assert_close(again, g1, rtol=0, atol=0)


def test_retain_graph_backward_twice_doubles_the_gradients():
    """loss.backward(retain_graph=True); loss.backward() accumulates the gradient twice (the
    first takes the stored gradients, the second runs the head again): exactly twice one
    backward's, which matches the naive head."""
    backend = _fused_backend()
    b = _batch(seed=5)

    def run():
        leaves = [b[k].detach().requires_grad_() for k in ("hidden", "weight", "bias")]
        out = ppokernels.linear_ppo_policy_loss(
            *leaves[:2],
            b["labels"],
            b["old"],
            b["adv"],
            b["mask"],
            bias=leaves[2],
            loss=SAPO(),
            chunk_size=16,
            backend=backend,
        )
        return leaves, out

    leaves, out = run()
    once = torch.autograd.grad(out.loss, leaves)
    leaves, out = run()
    out.loss.backward(retain_graph=True)
    out.loss.backward()
    for leaf, g in zip(leaves, once, strict=True):
        torch.testing.assert_close(leaf.grad, 2 * g, rtol=0, atol=0)
    if backend == "cpp":  # the Triton kernels take fp32 scalars (tau_neg = 1.05): not TOL64
        for g, want in zip(once, _naive(b, 1.0, True, loss=SAPO())[1], strict=True):
            torch.testing.assert_close(g, want, **TOL64)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        out.loss.backward()  # the third, after one without retain_graph: torch's own error


def test_no_grad_and_frozen_weight():
    b = _batch(seed=6)
    args = (b["labels"], b["old"], b["adv"], b["mask"])
    with torch.no_grad():
        out = ppokernels.linear_ppo_policy_loss(b["hidden"], b["weight"], *args)
    assert not out.loss.requires_grad
    h = b["hidden"].detach().requires_grad_()
    got = ppokernels.linear_ppo_policy_loss(h, b["weight"], *args, chunk_size=16)
    torch.testing.assert_close(got.loss, out.loss, rtol=1e-12, atol=1e-14)
    (gh,) = torch.autograd.grad(got.loss, h)
    want = _naive(b, 1.0, False)[1][0]
    torch.testing.assert_close(gh, want, **TOL64)


def test_all_tokens_masked_gives_zero_loss_and_gradients():
    b = _batch(seed=7)
    h = b["hidden"].detach().requires_grad_()
    out = ppokernels.linear_ppo_policy_loss(
        h, b["weight"], b["labels"], b["old"], b["adv"], torch.zeros_like(b["mask"])
    )
    (gh,) = torch.autograd.grad(out.loss, h)
    assert out.loss.item() == 0.0 and out.clipfrac.item() == 0.0 and (gh == 0).all()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(hidden=torch.zeros(4, 37)), "hidden"),
        (dict(weight=torch.zeros(53, 5, dtype=torch.float64)), "weight"),
        (dict(labels=torch.zeros(4, 36, dtype=torch.long)), "labels"),
        (dict(labels=torch.full((4, 37), 53)), "labels must be in"),
        (dict(old=torch.zeros(4, 36, dtype=torch.float64)), "old_logprobs"),
        (dict(loss="ppo2"), "unknown loss mode 'ppo2'"),
        (dict(loss=0.2), "loss must be a loss spec"),
        (dict(temperature=0.0), "temperature"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(agg="mean"), "agg must be one of"),
    ],
)
def test_bad_input_names_the_op_and_argument(change, match):
    b = _batch(seed=8)
    args = dict(hidden=b["hidden"], weight=b["weight"], labels=b["labels"], old=b["old"])
    kw = {k: v for k, v in change.items() if k not in args}
    args.update({k: v for k, v in change.items() if k in args})
    with pytest.raises((ValueError, TypeError), match=match) as e:
        ppokernels.linear_ppo_policy_loss(
            args["hidden"], args["weight"], args["labels"], args["old"], b["adv"], b["mask"], **kw
        )
    assert "linear_ppo_policy_loss" in str(e.value)


def _small(seed=9, V=7):
    b = _batch(B=3, T=12, H=3, V=V, seed=seed)
    b["mask"][2, 4:] = True  # _batch empties row 2; keep tokens in every row here
    b["labels"] = torch.where(b["mask"], b["labels"].clamp(min=0), -100)
    return b


def test_gradcheck_float64():
    b = _small()
    leaves = [b[k].detach().requires_grad_() for k in ("hidden", "weight", "bias")]

    def f(h, w, bias):  # x 0.5: the scaled-copy backward (upstream 1 hands the stored ones over)
        out = ppokernels.linear_ppo_policy_loss(
            h,
            w,
            b["labels"],
            b["old"],
            b["adv"],
            b["mask"],
            bias=bias,
            temperature=0.9,
            chunk_size=2,
            entropy_coef=0.01,
            ref_logprobs=b["ref"],
            kl_coef=0.1,
        )
        return 0.5 * out.loss

    assert torch.autograd.gradcheck(f, leaves)


def test_opcheck():
    backends = [_fused_backend()] * 3
    b = _small(seed=10)
    h, w, bias = (b[k].detach().requires_grad_() for k in ("hidden", "weight", "bias"))
    args = (
        h,
        w,
        b["labels"],
        b["old"],
        b["adv"],
        b["mask"],
        bias,
        b["ref"],
        None,
        0.8,
        True,
        16,
        *backends,
        "vanilla",
        [0.2, 0.2, math.inf],
        20.0,
        "token-mean",
        None,
        None,
        0.1,
        "k3",
        None,
        0.01,
        [True, True, True],
    )
    torch.library.opcheck(torch.ops.ppokernels.linear_ppo_policy_loss.default, args)


def test_torch_compile_fullgraph():
    b = _small(seed=11, V=1271)

    def f(h, w):
        out = ppokernels.linear_ppo_policy_loss(
            h, w, b["labels"], b["old"], b["adv"], b["mask"], chunk_size=16
        )
        return out.loss, out.clipfrac

    h = b["hidden"].detach().requires_grad_()
    w = b["weight"].detach().requires_grad_()
    got = torch.compile(f, fullgraph=True)(h, w)
    want = f(h, w)
    torch.testing.assert_close(got, want, **TOL64)
    g_got = torch.autograd.grad(got[0], (h, w))
    g_want = _naive(b, 1.0, False)[1]
    for a, x in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, x, **TOL64)


def test_reference_backend_and_empty_batch():
    b = _small(seed=12)
    kw = dict(loss=SAPO(), agg="seq-mean-token-sum")
    _assert_same(_fused(b, 0.8, True, "reference", None, **kw), _naive(b, 0.8, True, **kw), TOL64)
    h = torch.zeros(0, 4, 3, dtype=torch.float64, requires_grad=True)
    e = torch.zeros(0, 4, dtype=torch.float64)
    out = ppokernels.linear_ppo_policy_loss(
        h, b["weight"], torch.zeros(0, 4, dtype=torch.long), e, e, e.bool()
    )
    (gh,) = torch.autograd.grad(out.loss, h)
    assert out.loss.item() == 0.0 and gh.shape == h.shape


def test_schema_is_the_one_in_ops_cpp():
    """The Python copy of the schema (used only without the binary) is the binary's own."""
    if binary_skip_reason():
        pytest.skip(binary_skip_reason())
    from ppokernels.ops.linear_ppo_policy_loss import SCHEMA

    got = str(torch.ops.ppokernels.linear_ppo_policy_loss.default._schema)
    assert got == "ppokernels::" + SCHEMA
