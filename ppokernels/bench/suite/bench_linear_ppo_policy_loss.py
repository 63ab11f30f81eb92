"""The policy-loss head, forward + backward: hidden states and the lm_head weight in, the PPO loss
and the gradients of hidden and weight out.

Providers:

- ``naive``: ``hidden @ weight.T`` into full ``[N, V]`` logits, ``log_softmax``, gather, then the
  fused ``ppokernels.ppo_policy_loss`` (so the head, not the loss, is what differs): 3 GEMMs.
- ``linear_logprobs``: ``ppokernels.linear_logprobs`` then ``ppo_policy_loss``: blockwise, no
  ``[N, V]``; its backward reuses the logits within ``cache_bytes`` (default 512 MiB) and
  recomputes the rest: 3 GEMMs where they fit, 4 beyond.
- ``ppokernels-<backend>``: ``ppokernels.linear_ppo_policy_loss``, the gradients made during the
  forward: 3 GEMMs and an fp32 ``[chunk, V]`` buffer.
- ``ppokernels-cpp-chunk<R>`` (CPU): the same with ``chunk_size=R``: the time / memory trade-off of
  the buffer (smaller chunks hold less, but the GEMMs run slower at small M).
- ``liger-grpo`` when importable: Liger-Kernel's ``LigerFusedLinearGRPOLoss`` (the released class;
  beta = 0, its ``grpo`` loss type = the vanilla clip with a sequence-mean aggregation, torch
  chunks, compiled on the GPU), given the same inputs (one advantage per sequence).
- ``trl-chunked`` / ``verl-fused-linear`` when importable: the trainers' own blockwise log-prob
  heads (TRL 1.16 ``ChunkedLogProbFunction`` with its default 32768-column chunks; veRL 0.9.1
  ``FusedLinearForPPO`` with 512-token chunks, which computes the entropy too), then the same
  ``ppokernels.ppo_policy_loss``: the head is what differs, as for ``naive``.

The loss is the vanilla clip with ``agg="seq-mean-token-mean"`` (Liger's ``grpo``), temperature 0.7,
sequences of 512 tokens, one advantage per sequence. FLOPs counted: 6NHV for every provider (the
three GEMMs the loss needs), so ``tflops`` is comparable. Peak memory is what one call allocates
above the live inputs (the gradients included: [V, H] fp32 for the weight).
"""

import functools

import torch

import ppokernels
from ppokernels.bench import peers
from ppokernels.bench._common import matmul_tflops, ppokernels_providers, run
from ppokernels.losses import Clip

SHAPES = {
    "tiny": [(32, 16, 331)],
    "demo": [(1024, 256, 65536)],  # about a second per call on 2 CPU cores
    "cpu": [(1024, 512, 151936)],
    "llm": [(8192, 4096, 151936)],
}
TEMPERATURE = 0.7
SEQ_LEN = 512
CHUNK_SWEEP = (32, 64, 128)  # rows; the default is 128 MiB of fp32 logits (208 rows at V=151936)


TRAINER_HEADS = ("trl-chunked", "verl-fused-linear")


def providers(device):
    liger = peers.provider("liger-grpo", "liger-grpo")
    heads = [peers.provider(name, name) for name in TRAINER_HEADS]
    ours = ppokernels_providers(device)
    cpu_cpp = device == "cpu" and "ppokernels-cpp" in ours
    sweep = [f"ppokernels-cpp-chunk{r}" for r in CHUNK_SWEEP] if cpu_cpp else []
    return ["naive", "linear_logprobs", *ours, *sweep, liger, *heads]


def _trainer_head(provider):
    """(hidden [B, T, H], weight [V, H], labels [B, T]) -> the trainer's log-probs [B, T]."""
    if provider == "trl-chunked":
        fn = peers.peer(provider).apply
        head = lambda h, w, y: fn(h, w, None, y, TEMPERATURE, 32768, None, 1.0, ())[0]  # noqa: E731
    else:
        module = peers.peer(provider)(chunk_size=512)
        head = lambda h, w, y: module(h, w, y, temperature=TEMPERATURE)[0]  # noqa: E731

    def logprobs(h, w, y):
        return head(h.reshape(-1, h.shape[-1]), w, y.reshape(-1)).view(y.shape)

    return logprobs


@functools.cache
def _liger(device):
    cls = peers.peer("liger-grpo")
    return cls(
        beta=0.0,
        use_ref_model=False,
        temperature=TEMPERATURE,
        loss_type="grpo",
        epsilon_low=0.2,
        epsilon_high=0.2,
        compiled=device == "cuda",
    )


def _fn(provider, device):
    """(hidden [B, T, H], weight, labels, old, adv [B], mask) -> the loss."""
    loss_kw = dict(agg="seq-mean-token-mean", loss=Clip(0.2, 0.2))
    if provider == "naive":

        def naive(h, w, y, old, adv, m):
            z = (h @ w.T).float() / TEMPERATURE
            lp = torch.log_softmax(z, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
            return ppokernels.ppo_policy_loss(lp, old, adv, m, **loss_kw).loss

        return naive
    if provider == "linear_logprobs":

        def two_step(h, w, y, old, adv, m):
            lp, _ = ppokernels.linear_logprobs(h, w, y, temperature=TEMPERATURE)
            return ppokernels.ppo_policy_loss(lp, old, adv, m, **loss_kw).loss

        return two_step
    if provider in TRAINER_HEADS:
        head = _trainer_head(provider)

        def trainer_head(h, w, y, old, adv, m):
            lp = head(h, w, y)
            return ppokernels.ppo_policy_loss(lp, old, adv, m, **loss_kw).loss

        return trainer_head
    if provider == "liger-grpo":
        loss = _liger(device)
        return lambda h, w, y, old, adv, m: loss(h, w, y, m, adv, old_per_token_logps=old)[0]
    backend, _, chunk = provider.removeprefix("ppokernels-").partition("-chunk")
    loss_kw["chunk_size"] = int(chunk) if chunk else None
    return lambda h, w, y, old, adv, m: (
        ppokernels.linear_ppo_policy_loss(
            h, w, y, old, adv, m, temperature=TEMPERATURE, backend=backend, **loss_kw
        ).loss
    )


def test_linear_ppo_policy_loss(benchmark, shape, provider, device):
    n, H, V = shape
    B = max(1, n // SEQ_LEN)
    T = n // B
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    hidden = (torch.randn(B, T, H, device=device) * 0.5).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, device=device) / H**0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (B, T), device=device)
    old = torch.randn(B, T, device=device) * 0.1 - 11.0
    adv = torch.linspace(-1, 1, B, device=device)
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    mask[-1, T - T // 8 :] = False  # right padding
    fn = _fn(provider, device)
    if provider == "liger-grpo" or provider in TRAINER_HEADS:
        benchmark.extra_info["peer_import"] = peers.how(provider)

    def step():
        return torch.autograd.grad(fn(hidden, weight, labels, old, adv, mask), (hidden, weight))

    benchmark.group = f"linear_ppo_policy_loss forward+backward {shape} {str(dtype)[6:]}"
    run(benchmark, step, device=device, provider=provider, flops=6 * B * T * H * V)
    tf = benchmark.extra_info.get("tflops")
    if tf is not None:
        benchmark.extra_info["pct_matmul"] = round(100 * tf / matmul_tflops(device, dtype), 1)
