"""token_logprobs (log-prob of the label + entropy from [N, V] logits): ppokernels vs plain PyTorch.

Providers: ``reference`` (log_softmax + gather, ppokernels.reference), ``reference-compiled``
(the same under torch.compile), ``trl-formula`` (TRL's ``selective_log_softmax`` fp32 path: gather
minus a per-row logsumexp loop; bf16/fp16: per-row log_softmax + gather; entropy as TRL's chunked
``entropy_from_logits``; written here from research/trainers.md 4.2, not copied), and each built
ppokernels backend. Logits are fp32 on the CPU, bf16 on a GPU.

Bytes: forward reads the logits once (N V b); the backward reads them again and writes the
gradient (2 N V b), so forward+backward moves 3 N V b. Extra memory of the kernels is O(N).
On the CPU, forward+backward of the references needs ~4 [N, V] fp32 buffers, so the 4096-row
shape is benchmarked forward only (the machine's memory is shared).
"""

import pytest
import torch

import ppokernels
from ppokernels import reference
from ppokernels.bench._common import ppokernels_providers, run

SHAPES = {
    "tiny": [(4, 1271)],
    "cpu": [(1024, 151936), (4096, 151936)],
    "llm": [(8192, 128256), (8192, 151936)],
}
MODES = ["forward", "forward+backward", "forward+backward+entropy"]


def providers(device):
    kernels = ppokernels_providers(device)
    inplace = [f"{k}-inplace" for k in kernels]  # the backward overwrites the logits
    return ["reference", "reference-compiled", "trl-formula", *kernels, *inplace]


def _trl_logprobs(logits, labels):
    """TRL selective_log_softmax: fp32/fp64 gather - per-row logsumexp; else per-row log_softmax."""
    if logits.dtype in (torch.float32, torch.float64):
        picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
        return picked - lse
    return torch.stack(
        [
            torch.log_softmax(r, -1).gather(-1, i.unsqueeze(-1)).squeeze(-1)
            for r, i in zip(logits, labels, strict=True)
        ]
    )


def _trl_entropy(logits, chunk_size=128):
    """TRL entropy_from_logits: per 128-row chunk -sum(exp(logp) * logp)."""
    out = []
    for chunk in logits.split(chunk_size):
        logp = torch.log_softmax(chunk, -1)
        out.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(out)


def _fn(provider, with_entropy):
    if provider == "reference":
        return lambda x, y: reference.token_logprobs(x, y, with_entropy=with_entropy)
    if provider == "reference-compiled":
        return torch.compile(lambda x, y: reference.token_logprobs(x, y, with_entropy=with_entropy))
    if provider == "trl-formula":
        return lambda x, y: (_trl_logprobs(x, y), _trl_entropy(x) if with_entropy else None)
    backend = provider.removeprefix("ppokernels-").removesuffix("-inplace")
    inplace = provider.endswith("-inplace")
    return lambda x, y: ppokernels.token_logprobs(
        x, y, with_entropy=with_entropy, backend=backend, inplace_backward=inplace
    )


@pytest.mark.parametrize("mode", MODES)
def test_token_logprobs(benchmark, shape, provider, device, mode):
    n, V = shape
    backward = mode != "forward"
    if provider.endswith("-inplace") and not backward:
        pytest.skip("in-place changes only the backward")
    if device == "cpu" and backward and n * V > 2**28 and not benchmark.disabled:
        pytest.skip("CPU forward+backward: references need ~4 [N, V] fp32 buffers; use N=1024")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    leaf = torch.randn(n, V, device=device, dtype=dtype).mul_(2).requires_grad_(backward)
    labels = torch.randint(0, V, (n,), device=device)
    grad = torch.randn(n, device=device)
    fn = _fn(provider, "entropy" in mode)

    def step():
        # a fresh non-leaf each step, as the output of an lm_head is: its gradient flows on
        # without a copy (a leaf's .grad would clone an in-place gradient)
        logits = leaf.view(n, V)
        lp, ent = fn(logits, labels)
        if backward:
            outs, grads = [lp], [grad]
            if ent is not None:
                outs.append(ent)
                grads.append(grad)
            torch.autograd.backward(outs, grads)
            leaf.grad = None
        return lp

    benchmark.group = f"token_logprobs {mode} {shape} {str(dtype).removeprefix('torch.')}"
    run(
        benchmark,
        step,
        device=device,
        provider=provider,
        bytes_moved=n * V * leaf.element_size() * (3 if backward else 1),
    )
