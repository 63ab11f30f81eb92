"""linear_ppo_policy_loss: the conformance blocks from ``ppokernels.testing`` (every loss spec
with rows cut into segments (token modes) or sent to the unfused path (sequence modes), every
aggregation with and without global normalisers, KL / entropy / dual-clip / IS-weight terms,
per-row advantages, fp32 and fp64 against the fp64 specification (reference module) on every
backend, gradients of hidden, weight and bias; gradcheck, opcheck, compile, multi-turn masks with
NaN padding, all-masked rows and batches, bad input). Then what is special to the op: the
specification against the naive head it replaces (full logits, torch.log_softmax, the reference
policy loss, autograd), chunking that does not change the numbers, the stored gradients scaled,
handed over and recomputed for a retained graph, no_grad and a frozen weight, the schema."""

import inspect

import pytest
import torch

import ppokernels
from ppokernels import reference
from ppokernels.losses import AGG_MODES, LOSS_MODES, LOSS_SPECS, SAPO, Clip, loss_spec
from ppokernels.testing import (
    OpSpec,
    Sample,
    available_backends,
    binary_skip_reason,
    conformance_tests,
)

# The fused op's own checks (chunking, stored gradients) run on the C++ kernels, or without the
# binary (the pure-Python install) on the Triton kernels where they run on CPU tensors (FUSED;
# None: they skip), whose fp32 scalars (tau_neg = 1.05, ...) miss TOL64.
FUSED = next((k for k in ("cpp", "triton") if k in available_backends("cpu")), None)
AGGS = AGG_MODES
MODE_FIELDS = {"dro": dict(beta=0.1), "cispo": dict(clip_high=0.3), "dppo_tv": dict(clip_high=0.3)}
SEQUENCE_MODES = [m for m, c in LOSS_SPECS.items() if c.row_level]
NAME = "linear_ppo_policy_loss"
TOL64 = dict(rtol=1e-9, atol=1e-11)


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


def _fused_backend() -> str:
    """FUSED, or skip: without the binary and Triton on CPU the fused op has no kernels here."""
    if FUSED is None:
        pytest.skip(binary_skip_reason())
    return FUSED


def _small(seed=9, V=7, dtype=torch.float64, device="cpu"):
    b = _batch(B=3, T=12, H=3, V=V, dtype=dtype, device=device, seed=seed)
    b["mask"][2, 4:] = True  # _batch empties row 2; keep tokens in every row here
    b["labels"] = torch.where(b["mask"], b["labels"].clamp(min=0), -100)
    return b


def _sample(name, b, **kw):
    """A Sample of a _batch: the six tensors positional, the bias a keyword tensor."""
    args = tuple(b[k] for k in ("hidden", "weight", "labels", "old", "adv", "mask"))
    return Sample(args, kw, name)


def samples(device, dtype):
    out = []
    for mode in LOSS_MODES:
        for chunk in (16, 64, None):  # 16: rows cut (or unfused), 64: whole rows
            b = _batch(dtype=dtype, device=device)
            kw = dict(loss=_spec(mode), bias=b["bias"], temperature=0.8, with_entropy=True)
            out.append(_sample(f"{mode}-chunk{chunk}", b, **kw, chunk_size=chunk))
    for agg in AGGS:
        for mode in ("vanilla", "gspo", "cispo"):
            for extra in ({}, dict(num_tokens=50.0, num_seqs=7.0)):
                b = _batch(dtype=dtype, device=device, seed=1)
                kw = dict(loss=_spec(mode), agg=agg, chunk_size=16, **extra)
                name = f"{agg}-{mode}" + ("-global" if extra else "")
                out.append(_sample(name, b, **kw))
    for adv_rows in (False, True):
        b = _batch(dtype=dtype, device=device, seed=2)
        if adv_rows:
            b["adv"] = b["adv"][:, 0].contiguous()
        isw = (torch.rand(4, 37, dtype=torch.float64) + 0.5).to(device=device, dtype=dtype)
        kw = dict(
            bias=b["bias"],
            temperature=0.7,
            chunk_size=16,
            ref_logprobs=b["ref"],
            kl_coef=0.05,
            kl_estimator="k3",
            entropy_coef=0.01,
            loss=Clip(0.2, 0.28, dual_clip=3.0),
            is_weights=isw,
            agg="seq-mean-token-mean",
        )
        out.append(_sample("kl-entropy-dual-isw" + ("-adv-rows" if adv_rows else ""), b, **kw))
    b = _small(dtype=dtype, device=device)
    kw = dict(bias=b["bias"], temperature=0.9, chunk_size=2, entropy_coef=0.01)
    out.append(_sample("small", b, **kw, ref_logprobs=b["ref"], kl_coef=0.1))
    b = _small(seed=11, V=1271, dtype=dtype, device=device)
    out.append(_sample("small-v1271", b, chunk_size=16, loss=SAPO(), with_entropy=True))
    h = torch.zeros(0, 4, 3, dtype=dtype, device=device)
    e = torch.zeros(0, 4, dtype=dtype, device=device)
    y = torch.zeros(0, 4, dtype=torch.long, device=device)
    w = torch.randn(7, 3, dtype=dtype, device=device)
    out.append(Sample((h, w, y, e, e, e.bool()), {}, "empty"))
    return out


def masked_samples(device, dtype):
    """Rows without a valid token (_batch empties row 2) and a batch without one."""
    b = _batch(B=3, T=20, dtype=dtype, device=device, seed=7)
    kw = dict(bias=b["bias"], ref_logprobs=b["ref"], kl_coef=0.1, entropy_coef=0.1, chunk_size=16)
    none = dict(b, mask=torch.zeros_like(b["mask"]))
    return [_sample("rows", b, **kw), _sample("all", none, **kw)]


def _reference(*args, chunk_size=None, **kw):
    """The specification; ``chunk_size`` only tiles the kernels' work."""
    return reference.linear_ppo_policy_loss(*args, **kw)


def _tol(dtype, backend):
    if dtype == torch.float32:
        return dict(rtol=2e-4, atol=2e-5)  # fp32 GEMMs over H and sums over V
    # the Triton kernels take their scalars (clip bounds, tau) as fp32
    return dict(rtol=1e-6, atol=1e-7) if backend == "triton" else TOL64


_DEFAULTS = {
    k: p.default
    for k, p in inspect.signature(ppokernels.linear_ppo_policy_loss).parameters.items()
    if p.kind is p.KEYWORD_ONLY and k != "backend"
}


def _opcheck(s):
    """The op's arguments for a sample, as the public function passes them: labels set to -100
    off the mask, every kernel family on FUSED, the gradients of hidden, weight and bias."""
    from ppokernels.ops.ppo_policy_loss import policy_options

    hidden, weight, labels, old, adv, mask = s.args
    kw = _DEFAULTS | s.kwargs
    leaf = lambda t: None if t is None else t.detach().clone().requires_grad_()  # noqa: E731
    ent_on = kw["with_entropy"] or kw["entropy_coef"] != 0.0
    policy = {k: kw[k] for k in inspect.signature(policy_options).parameters if k in kw}
    _, options = policy_options(
        NAME, **policy, has_ref=kw["ref_logprobs"] is not None, has_entropy=ent_on
    )
    valid = mask & (labels != kw["ignore_index"])
    args = (
        leaf(hidden),
        leaf(weight),
        torch.where(valid, labels, -100),
        old,
        adv,
        valid,
        leaf(kw["bias"]),
        kw["ref_logprobs"],
        kw["is_weights"],
        kw["temperature"],
        ent_on,
        kw["chunk_size"] or 16,
        *[FUSED] * 3,
        *options,
        [True, True, kw["bias"] is not None],
    )
    return [(torch.ops.ppokernels.linear_ppo_policy_loss.default, args)]


def _bad_inputs():
    b = _batch(seed=8)
    base = dict(hidden=b["hidden"], weight=b["weight"], labels=b["labels"], old=b["old"])

    def call(**change):
        args = base | {k: v for k, v in change.items() if k in base}
        kw = {k: v for k, v in change.items() if k not in base}
        pos = (args["hidden"], args["weight"], args["labels"], args["old"], b["adv"], b["mask"])
        return lambda: ppokernels.linear_ppo_policy_loss(*pos, **kw)

    cases = [
        (call(hidden=torch.zeros(4, 37)), ValueError, "hidden must have 3 dimensions"),
        (call(weight=torch.zeros(53, 5, dtype=torch.float64)), ValueError, "weight has H = 5"),
        (call(labels=torch.zeros(4, 36, dtype=torch.long)), ValueError, "labels has shape"),
        (call(labels=torch.full((4, 37), 53)), ValueError, "labels must be in"),
        (call(old=torch.zeros(4, 36, dtype=torch.float64)), ValueError, "old_logprobs has shape"),
        (call(loss="ppo2"), ValueError, "unknown loss mode 'ppo2'"),
        (call(loss=0.2), TypeError, "loss must be a loss spec"),
        (call(temperature=0.0), ValueError, "temperature must be > 0"),
        (call(chunk_size=0), ValueError, "chunk_size"),
        (call(agg="mean"), ValueError, "agg must be one of"),
        (call(bias=torch.zeros(3, dtype=torch.float64)), ValueError, "bias has 3 entries"),
        (call(backend="fast"), ValueError, "backend"),
    ]
    return [(f, exc, f"{NAME}: .*{msg}") for f, exc, msg in cases]


SPEC = OpSpec(
    name=NAME,
    fn=ppokernels.linear_ppo_policy_loss,
    reference=_reference,
    samples=samples,
    differentiable=(0, 1, "bias"),
    masked_sample=masked_samples,
    mask_arg=5,
    bad_inputs=_bad_inputs(),
    opcheck=_opcheck if FUSED else None,
    tolerances=_tol,
    gradcheck_samples=["small"],
    opcheck_samples=["small", "sapo-chunk16", "kl-entropy-dual-isw-adv-rows"],
    compile_samples=["small-v1271", "kl-entropy-dual-isw"],
    # the Triton interpreter runs a kernel launch per chunk and family: a sample per path
    interpreter_samples=[
        "vanilla-chunk16",
        "gspo-chunk16",
        "sapo-chunk64",
        "seq-mean-token-mean-cispo-global",
        "kl-entropy-dual-isw-adv-rows",
        "small",
        "empty",
    ],
)
globals().update(conformance_tests(SPEC))


@pytest.mark.parametrize("mode", LOSS_MODES)
def test_specification_is_the_naive_head(mode):
    """The reference module (built on linear_logprobs_stats) equals the head it replaces."""
    b = _batch(seed=3)
    for kw in (dict(loss=_spec(mode)), dict(loss=_spec(mode), agg="seq-mean-token-sum-norm")):
        want = _naive(b, 0.8, True, **kw)
        leaves = [b[k].detach().double().requires_grad_() for k in ("hidden", "weight", "bias")]
        args = (b["labels"], b["old"], b["adv"], b["mask"])
        out = reference.linear_ppo_policy_loss(
            *leaves[:2], *args, bias=leaves[2], temperature=0.8, with_entropy=True, **kw
        )
        _assert_same((out, torch.autograd.grad(out.loss, leaves)), want, TOL64)


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


def test_schema_is_the_one_in_ops_cpp():
    """The Python copy of the schema (used only without the binary) is the binary's own."""
    if binary_skip_reason():
        pytest.skip(binary_skip_reason())
    from ppokernels.ops.linear_ppo_policy_loss import SCHEMA

    got = str(torch.ops.ppokernels.linear_ppo_policy_loss.default._schema)
    assert got == "ppokernels::" + SCHEMA
