"""linear_logprobs (log-probs, with or without entropy, from hidden states and the lm_head weight)
vs the naive path that materialises the logits and vs the published fused heads.

Providers: ``naive`` (hidden @ weight.T, log_softmax, gather, entropy), each built ppokernels
backend twice: ``ppokernels-<backend>`` with the default logits cache
(``ppokernels.ops.linear_logprobs.CACHE_BYTES``: the backward reads the forward's logits where they
fit it) and ``ppokernels-<backend>-nocache`` (``cache_bytes=0``: the backward recomputes every
logit), and, when importable (``ppokernels.bench.peers``; skipped at collection with the reason
otherwise):

- ``verl-fused-linear``: veRL ``FusedLinearForPPO`` (torch, 512-token chunks; always computes
  entropy too), ``verl-triton``: veRL's Triton ``linear_cross_entropy`` (GPU; entropy too);
- ``trl-chunked``: TRL 1.16 ``ChunkedLogProbFunction`` (cuBLAS chunks + a Triton fold on GPUs,
  torch ops on the CPU; entropy on request), with TRL's default 32768-column chunks;
- ``liger-grpo``: Liger-Kernel ``LigerFusedLinearGRPOLoss`` (torch chunks, compiled on the GPU),
  the whole GRPO loss stage (beta=0, one advantage per 512-token sequence), log-probs only;
- ``liger-flce``: Liger-Kernel ``liger_fused_linear_cross_entropy(reduction="none")`` (Triton,
  GPU), ``cce``: Cut Cross-Entropy ``linear_cross_entropy(reduction="none")`` (Triton, GPU): the
  log-prob is minus the per-token loss; neither takes a temperature, so the hidden states are
  scaled by 1 / T first (one elementwise pass), and neither computes entropy.

Shapes are (N, H, V); the llm ones are the published competition's (N=8192, H=4096, V=128256 and
151936, bf16). FLOPs counted: 2NHV forward, 6NHV forward + backward (the naive path's three
GEMMs; a fused head without a cache recomputes the logits, 8NHV of work, and with one recomputes
only the tiles past its budget, so all rates are on equal terms).
``pct_matmul`` is that rate over the measured dense matmul rate of the same dtype. Peak memory is
what one call allocates above the live inputs; gradients are returned by ``torch.autograd.grad``
so each call allocates (and frees) its own.
"""

import functools

import pytest
import torch

import ppokernels
from ppokernels.bench import peers
from ppokernels.bench._common import matmul_tflops, ppokernels_providers, run

SHAPES = {
    "tiny": [(16, 32, 1271)],
    "cpu": [(1024, 512, 151936)],
    "llm": [(8192, 4096, 128256), (8192, 4096, 151936)],
}
TEMPERATURE = 0.7
SEQ_LEN = 512  # liger-grpo: tokens per sequence (one advantage each)
# provider -> the peers it calls
PEER_PROVIDERS = {
    "verl-fused-linear": ("verl-fused-linear",),
    "verl-triton": ("verl-triton",),
    "trl-chunked": ("trl-chunked",),
    "liger-grpo": ("liger-grpo",),
    "liger-flce": ("liger-flce",),
    "cce": ("cce",),
}
NO_ENTROPY = ("liger-grpo", "liger-flce", "cce")


NO_CACHE = "-nocache"  # provider suffix: cache_bytes=0


def providers(device):
    params = [peers.provider(name, *deps) for name, deps in PEER_PROVIDERS.items()]
    ours = [p for b in ppokernels_providers(device) for p in (b, b + NO_CACHE)]
    return ["naive", *ours, *params]


def naive(hidden, weight, labels, with_entropy):
    logits = (hidden @ weight.T).to(torch.promote_types(hidden.dtype, torch.float32)) / TEMPERATURE
    logp = torch.log_softmax(logits, dim=-1)
    lp = logp.gather(1, labels[:, None]).squeeze(1)
    return lp, (-(logp.exp() * logp).sum(-1) if with_entropy else None)


@functools.cache
def _liger_grpo(device):
    cls = peers.peer("liger-grpo")
    return cls(beta=0.0, use_ref_model=False, temperature=TEMPERATURE, compiled=device == "cuda")


def _peer_fn(provider, device, with_entropy):
    """A function (hidden [N, H], weight [V, H], labels [N]) -> (log-probs [N] or the GRPO loss [],
    entropy [N] or None) calling the peer's released code."""
    if provider == "verl-fused-linear":
        head = peers.peer(provider)(chunk_size=512)
        return lambda h, w, y: head(h, w, y, temperature=TEMPERATURE)
    if provider == "verl-triton":
        fn = peers.peer(provider)
        return lambda h, w, y: fn(h, w, y, TEMPERATURE, "none")
    if provider == "trl-chunked":
        fn, outputs = peers.peer(provider).apply, ("entropy",) if with_entropy else ()
        return lambda h, w, y: fn(h, w, None, y, TEMPERATURE, 32768, None, 1.0, outputs)[:2]
    if provider == "liger-grpo":
        loss = _liger_grpo(device)

        def grpo(h, w, y):
            n = h.shape[0]
            b = max(1, n // SEQ_LEN)
            t = n // b
            ids, hid = y[: b * t].view(b, t), h[: b * t].view(b, t, -1)
            adv = torch.linspace(-1, 1, b, device=h.device)
            return loss(hid, w, ids, torch.ones_like(ids), adv)[0], None

        return grpo
    fn = peers.peer(provider)  # liger-flce, cce: per-token loss = -log-prob
    return lambda h, w, y: (-fn(h / TEMPERATURE, w, y, reduction="none"), None)


def _fn(provider, device, with_entropy):
    if provider == "naive":
        return lambda h, w, y: naive(h, w, y, with_entropy)
    if provider in PEER_PROVIDERS:
        return _peer_fn(provider, device, with_entropy)
    backend = provider.removeprefix("ppokernels-").removesuffix(NO_CACHE)
    cache = {"cache_bytes": 0} if provider.endswith(NO_CACHE) else {}

    def fused(hidden, weight, labels):
        return ppokernels.linear_logprobs(
            hidden,
            weight,
            labels,
            temperature=TEMPERATURE,
            with_entropy=with_entropy,
            backend=backend,
            **cache,
        )

    return fused


@pytest.mark.parametrize("entropy", ["with-entropy", "logprobs-only"])
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
def test_linear_logprobs(benchmark, shape, provider, device, mode, entropy):
    with_entropy = entropy == "with-entropy"
    if with_entropy and provider in NO_ENTROPY:
        pytest.skip(f"{provider}: computes no entropy")
    if mode == "forward" and provider.endswith(NO_CACHE):
        pytest.skip(f"{provider}: a forward without gradients keeps no cache in any setting")
    n, h, v = shape
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    grad = mode != "forward"
    hidden = (torch.randn(n, h, device=device) * 0.5).to(dtype).requires_grad_(grad)
    weight = (torch.randn(v, h, device=device) / h**0.5).to(dtype).requires_grad_(grad)
    labels = torch.randint(0, v, (n,), device=device)
    g_lp = torch.randn(n, device=device)
    g_ent = torch.randn(n, device=device) * 0.01
    fn = _fn(provider, device, with_entropy)
    if provider in PEER_PROVIDERS:
        benchmark.extra_info["peer_import"] = peers.how(PEER_PROVIDERS[provider][0])

    def step():
        with torch.set_grad_enabled(grad):
            lp, ent = fn(hidden, weight, labels)
            if not grad:
                return lp, ent
            # a loss (liger-grpo) is a scalar: its upstream gradient is 1
            outs, grads = [lp], [g_lp if lp.dim() else None]
            if with_entropy and ent is not None:
                outs.append(ent)
                grads.append(g_ent)
            return torch.autograd.grad(outs, (hidden, weight), grads)

    benchmark.group = (
        f"linear_logprobs {mode} {entropy} {shape} {str(dtype).removeprefix('torch.')}"
    )
    flops = 2 * n * h * v * (3 if grad else 1)
    run(benchmark, step, device=device, provider=provider, flops=flops)
    tf = benchmark.extra_info.get("tflops")
    if tf is not None:
        benchmark.extra_info["pct_matmul"] = round(100 * tf / matmul_tflops(device, dtype), 1)
