"""Every CPU op, forward and backward, on fixed inputs: run once per ISA level of the CPU kernels
(tests/build/test_cpu_isa.py starts ``python tests/build/_cpu_isa_cases.py IN OUT`` with
PPOKERNELS_CPU_ISA set) and once in fp64 on the reference backend, to compare the levels with
each other and with the reference.

Shapes are not multiples of the SIMD widths (8 and 16 lanes), so every level runs its vector body
and its scalar tail.
"""

from __future__ import annotations

import sys

import torch

import ppokernels
from ppokernels.losses import GSPO, Clip

B, T, V, H = 5, 203, 1003, 24


def inputs() -> dict[str, torch.Tensor]:
    """fp32 inputs of every case (float64 copies feed the reference)."""
    g = torch.Generator().manual_seed(16)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    mask = torch.rand(B, T, generator=g) < 0.8
    mask[:, -5:] = False
    mask[1, :40] = False  # a whole SIMD chunk of padding: the skipped-chunk path
    labels = torch.randint(0, V, (B * 8,), generator=g)
    labels[3] = -100
    lp = -torch.rand(B, T, generator=g) * 3
    return {
        "lp": lp,
        "old": lp + randn(B, T, scale=0.3),
        "ref": lp + randn(B, T, scale=0.3),
        "adv": randn(B, T),
        "ent": torch.rand(B, T, generator=g) * 2,
        "values": randn(B, T),
        "old_values": randn(B, T),
        "returns": randn(B, T),
        "rewards": randn(B, T),
        "mask": mask,
        "scores": randn(24),
        "groups": torch.arange(24) % 6,
        "logits": randn(B * 8, V, scale=3.0),
        "labels": labels,
        "hidden": randn(B * 8, H),
        "weight": randn(V, H, scale=0.3),
        # gae's SIMD scan takes 8 or 16 rows per step and skews its tiles when a row is a
        # multiple of 1 KiB: 19 rows of 256 steps run a full group, a partial one and the skew
        "rewards_256": randn(19, 256),
        "values_256": randn(19, 256),
        "mask_256": torch.rand(19, 256, generator=g) < 0.8,
        # and splits few long rows into chunks, one per lane (3 rows of 16384: 24 or 48 chunks)
        "rewards_long": randn(3, 16384),
        "values_long": randn(3, 16384),
        "mask_long": torch.rand(3, 16384, generator=g) < 0.8,
    }


def _outputs(result) -> list[torch.Tensor]:
    items = result if isinstance(result, (tuple, list)) else (result,)
    return [t for t in items if isinstance(t, torch.Tensor)]


# name -> (the tensors that get gradients, fn(x, backend) -> output or tuple of outputs)
CASES = {
    "kl_k3": (["lp", "ref"], lambda x, b: ppokernels.kl_penalty(x["lp"], x["ref"], backend=b)),
    "kl_k1_clamp": (
        ["lp", "ref"],
        lambda x, b: ppokernels.kl_penalty(x["lp"], x["ref"], estimator="k1", clamp=0.2, backend=b),
    ),
    "kl_k2": (
        ["lp", "ref"],
        lambda x, b: ppokernels.kl_penalty(x["lp"], x["ref"], estimator="k2", backend=b),
    ),
    "gae_skip": (
        ["rewards", "values"],
        lambda x, b: ppokernels.gae(
            x["rewards"], x["values"], x["mask"], gamma=0.99, lam=0.95, backend=b
        ),
    ),
    "gae_zero": (
        ["rewards", "values"],
        lambda x, b: ppokernels.gae(
            x["rewards"], x["values"], x["mask"], gamma=0.9, lam=0.8, mode="zero", backend=b
        ),
    ),
    "gae_skewed_tiles": (
        ["rewards_256", "values_256"],
        lambda x, b: ppokernels.gae(
            x["rewards_256"], x["values_256"], x["mask_256"], gamma=0.99, lam=0.95, backend=b
        ),
    ),
    "gae_chunked_rows": (
        ["rewards_long", "values_long"],
        lambda x, b: ppokernels.gae(
            x["rewards_long"],
            x["values_long"],
            x["mask_long"],
            gamma=0.99,
            lam=0.95,
            mode="zero",
            backend=b,
        ),
    ),
    "returns_chunked_rows": (
        ["rewards_long"],
        lambda x, b: ppokernels.discounted_returns(
            x["rewards_long"], x["mask_long"], gamma=0.97, backend=b
        ),
    ),
    "returns": (
        ["rewards"],
        lambda x, b: ppokernels.discounted_returns(x["rewards"], x["mask"], gamma=0.97, backend=b),
    ),
    "masked_mean_var": (
        ["values"],
        lambda x, b: (
            ppokernels.masked_mean(x["values"], x["mask"], backend=b),
            ppokernels.masked_var(x["values"], x["mask"], backend=b),
        ),
    ),
    "masked_whiten": (
        ["adv"],
        lambda x, b: ppokernels.masked_whiten(x["adv"], x["mask"], backend=b),
    ),
    "masked_whiten_noshift": (
        ["adv"],
        lambda x, b: ppokernels.masked_whiten(
            x["adv"], x["mask"], shift_mean=False, unbiased=False, backend=b
        ),
    ),
    "group_grpo": (
        ["scores"],
        lambda x, b: ppokernels.group_advantages(x["scores"], x["groups"], backend=b),
    ),
    "group_rloo": (
        ["scores"],
        lambda x, b: ppokernels.group_advantages(
            x["scores"], x["groups"], estimator="rloo", backend=b
        ),
    ),
    "token_logprobs": (
        ["logits"],
        lambda x, b: ppokernels.token_logprobs(x["logits"], x["labels"], backend=b),
    ),
    "token_logprobs_entropy": (
        ["logits"],
        lambda x, b: ppokernels.token_logprobs(
            x["logits"], x["labels"], temperature=0.7, with_entropy=True, backend=b
        ),
    ),
    "linear_logprobs_entropy": (
        ["hidden", "weight"],
        lambda x, b: ppokernels.linear_logprobs(
            x["hidden"], x["weight"], x["labels"], with_entropy=True, chunk_size=256, backend=b
        ),
    ),
    "ppo_policy_loss": (
        ["lp", "ref", "ent"],
        lambda x, b: ppokernels.ppo_policy_loss(
            x["lp"],
            x["old"],
            x["adv"],
            x["mask"],
            loss=Clip(0.2, 0.28, dual_clip=3.0),
            ref_logprobs=x["ref"],
            kl_coef=0.1,
            entropy=x["ent"],
            entropy_coef=0.01,
            backend=b,
        ),
    ),
    "ppo_policy_loss_seq": (
        ["lp"],
        lambda x, b: ppokernels.ppo_policy_loss(
            x["lp"],
            x["old"],
            x["adv"],
            x["mask"],
            loss=GSPO(),
            agg="seq-mean-token-mean",
            backend=b,
        ),
    ),
    "value_loss": (
        ["values"],
        lambda x, b: ppokernels.value_loss(
            x["values"], x["old_values"], x["returns"], x["mask"], clip=0.2, backend=b
        ),
    ),
    "rollout_correction_token": (
        [],
        lambda x, b: _rollout_correction(
            x, x["mask"], b, criteria={"token_k3": 0.05, "seq_mean_k1": (-0.1, 0.1)}
        ),
    ),
    "rollout_correction_sequence_half_mask": (
        [],
        lambda x, b: _rollout_correction(
            x,
            x["mask"].half(),
            b,
            level="sequence",
            mode="mask",
            bounds=(0.5, 2.0),
            criteria={"token_tv": 0.2, "seq_max_k2": 0.5},
        ),
    ),
}


def _rollout_correction(x, mask, backend, **kw):
    """Weights, rejection mask and metrics of rollout_correction (constants: no gradient), as
    fp32 (the reference's fp64 metrics are compared with these)."""
    out = ppokernels.rollout_correction(x["old"], x["ref"], mask, backend=backend, **kw)
    metrics = torch.stack(list(out.metrics.values()))
    return out.weights, out.mask.to(out.weights.dtype), metrics.to(out.weights.dtype)


def run(x: dict[str, torch.Tensor], backend: str) -> dict[str, torch.Tensor]:
    """Outputs and input gradients of every case, keyed "<case>/out<i>" and "<case>/d<input>".
    The upstream gradient of each output is a fixed random tensor of its shape."""
    results = {}
    for k, (name, (grad_names, fn)) in enumerate(CASES.items()):
        xs = {
            n: (t.clone().requires_grad_(n in grad_names) if t.is_floating_point() else t)
            for n, t in x.items()
        }
        outs = _outputs(fn(xs, backend))
        g = torch.Generator().manual_seed(k)
        total = 0
        for i, o in enumerate(outs):
            results[f"{name}/out{i}"] = o.detach()
            if o.requires_grad:
                w = torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype)
                total = total + (o * w).sum()
        if isinstance(total, torch.Tensor):  # not for ops whose outputs are constants
            total.backward()
        for n in grad_names:
            results[f"{name}/d{n}"] = xs[n].grad
    return results


if __name__ == "__main__":
    from ppokernels import _backend

    data = torch.load(sys.argv[1])
    out = run(data, "cpp")
    out["cpu_isa"] = _backend.cpu_isa()
    torch.save(out, sys.argv[2])
