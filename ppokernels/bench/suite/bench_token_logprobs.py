"""token_logprobs (log-prob of the label + entropy from [N, V] logits): ppokernels vs plain PyTorch
and the trainers' own functions.

Providers: ``read-pass`` (forward modes only: ``logits.sum(-1)``, one read of the logits, the
bound of any forward), ``reference`` (log_softmax + gather, ppokernels.reference),
``reference-compiled`` (the same under torch.compile), each built ppokernels backend (and its
in-place backward), and, when importable (``ppokernels.bench.peers``), the trainers' released
functions: ``trl`` (``trl.trainer.utils.selective_log_softmax`` + ``entropy_from_logits``), ``verl``
(``verl.utils.torch_functional.logprobs_from_logits`` + ``entropy_from_logits``) and ``openrlhf``
(``openrlhf.models.utils.log_probs_from_logits``; OpenRLHF has no entropy function of its own
beside a compiled formula, so its entropy modes are skipped). Logits are fp32 on the CPU, bf16 on
a GPU.

Bytes: forward reads the logits once (N V b); the backward reads them again and writes the
gradient (2 N V b), so forward+backward moves 3 N V b. Extra memory of the kernels is O(N).
On the CPU, forward+backward of the references needs ~4 [N, V] fp32 buffers, so the 4096-row
shape is benchmarked forward only (the machine's memory is shared).
"""

import pytest
import torch

import ppokernels
from ppokernels import reference
from ppokernels.bench import peers
from ppokernels.bench._common import ppokernels_providers, run

SHAPES = {
    "tiny": [(4, 1271)],
    "cpu": [(1024, 151936), (4096, 151936)],
    "llm": [(8192, 128256), (8192, 151936)],
}
MODES = ["forward", "forward+entropy", "forward+backward", "forward+backward+entropy"]


# provider -> (log-prob peer, entropy peer or None)
PEER_FNS = {
    "trl": ("trl-selective", "trl-entropy"),
    "verl": ("verl-logprobs", "verl-entropy"),
    "openrlhf": ("openrlhf-logprobs", None),
}


def providers(device):
    kernels = ppokernels_providers(device)
    inplace = [f"{k}-inplace" for k in kernels]  # the backward overwrites the logits
    peer_params = [peers.provider(name, *filter(None, fns)) for name, fns in PEER_FNS.items()]
    return ["read-pass", "reference", "reference-compiled", *peer_params, *kernels, *inplace]


def _fn(provider, with_entropy):
    if provider == "read-pass":
        return lambda x, y: (x.sum(-1), None)
    if provider == "reference":
        return lambda x, y: reference.token_logprobs(x, y, with_entropy=with_entropy)
    if provider == "reference-compiled":
        return torch.compile(lambda x, y: reference.token_logprobs(x, y, with_entropy=with_entropy))
    if provider in PEER_FNS:
        lp_name, ent_name = PEER_FNS[provider]
        if with_entropy and ent_name is None:
            pytest.skip(f"{provider}: no entropy function of its own")
        lp_fn = peers.peer(lp_name)
        ent_fn = peers.peer(ent_name) if with_entropy else None
        return lambda x, y: (lp_fn(x, y), ent_fn(x) if ent_fn else None)
    backend = provider.removeprefix("ppokernels-").removesuffix("-inplace")
    inplace = provider.endswith("-inplace")
    return lambda x, y: ppokernels.token_logprobs(
        x, y, with_entropy=with_entropy, backend=backend, inplace_backward=inplace
    )


@pytest.mark.parametrize("mode", MODES)
def test_token_logprobs(benchmark, shape, provider, device, mode):
    n, V = shape
    backward = "backward" in mode
    if provider == "read-pass" and backward:
        pytest.skip("read-pass: the bound of a forward only")
    if provider.endswith("-inplace") and not backward:
        pytest.skip("in-place changes only the backward")
    if device == "cpu" and backward and n * V > 2**28 and not benchmark.disabled:
        pytest.skip("CPU forward+backward: references need ~4 [N, V] fp32 buffers; use N=1024")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    leaf = torch.randn(n, V, device=device, dtype=dtype).mul_(2).requires_grad_(backward)
    labels = torch.randint(0, V, (n,), device=device)
    grad = torch.randn(n, device=device)
    fn = _fn(provider, "entropy" in mode)
    if provider in PEER_FNS:
        benchmark.extra_info["peer_import"] = peers.how(PEER_FNS[provider][0])

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
