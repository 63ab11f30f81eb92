"""linear_logprobs (log-probs + entropy from hidden states and the lm_head weight) vs the naive
path that materialises the logits (hidden @ weight.T, log_softmax, gather, entropy).

Shapes are (N, H, V). FLOPs counted: 2NHV forward, 6NHV forward + backward (the naive path's
three GEMMs; ppokernels recomputes the logits, 8NHV of work, so its rate is on equal terms with
the naive one). ``pct_matmul`` compares with the measured dense matmul rate of the same dtype.
Peak memory (``peak_mem_mb``) is what one call allocates above the live inputs; gradients are
returned by ``torch.autograd.grad`` so each call allocates (and frees) its own.
"""

import pytest
import torch

import ppokernels
from ppokernels.bench._common import matmul_tflops, ppokernels_providers, run

SHAPES = {
    "tiny": [(16, 32, 1271)],
    "cpu": [(1024, 512, 151936)],
    "llm": [(8192, 4096, 128256), (8192, 4096, 151936)],
}
TEMPERATURE = 0.7


def providers(device):
    return ["naive", *ppokernels_providers(device)]


def naive(hidden, weight, labels):
    logits = (hidden @ weight.T).float() / TEMPERATURE
    logp = torch.log_softmax(logits, dim=-1)
    lp = logp.gather(1, labels[:, None]).squeeze(1)
    entropy = -(logp.exp() * logp).sum(-1)
    return lp, entropy


def _fn(provider):
    if provider == "naive":
        return naive
    backend = provider.removeprefix("ppokernels-")

    def fused(hidden, weight, labels):
        return ppokernels.linear_logprobs(
            hidden, weight, labels, temperature=TEMPERATURE, with_entropy=True, backend=backend
        )

    return fused


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
def test_linear_logprobs(benchmark, shape, provider, device, mode):
    n, h, v = shape
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    grad = mode != "forward"
    hidden = (torch.randn(n, h, device=device) * 0.5).to(dtype).requires_grad_(grad)
    weight = (torch.randn(v, h, device=device) / h**0.5).to(dtype).requires_grad_(grad)
    labels = torch.randint(0, v, (n,), device=device)
    g_lp = torch.randn(n, device=device)
    g_ent = torch.randn(n, device=device) * 0.01
    fn = _fn(provider)

    def step():
        with torch.set_grad_enabled(grad):
            lp, ent = fn(hidden, weight, labels)
            if grad:
                return torch.autograd.grad((lp, ent), (hidden, weight), (g_lp, g_ent))
            return lp, ent

    benchmark.group = f"linear_logprobs {mode} {shape} {str(dtype).removeprefix('torch.')}"
    flops = 2 * n * h * v * (3 if grad else 1)
    run(benchmark, step, device=device, provider=provider, flops=flops)
    tf = benchmark.extra_info.get("tflops")
    if tf is not None:
        benchmark.extra_info["pct_matmul"] = round(100 * tf / matmul_tflops(device, dtype), 1)
