"""ppo_policy_loss's loss modes, forward + backward: veRL 0.9.1's registered policy losses (the
trainer's eager functions, ``verl.trainer.ppo.core_algos.get_policy_loss_fn(mode)``) vs their
ppokernels.compat.verl drop-ins on the fused op, and TRL 1.16's cispo / sapo / vespo
(``GRPOTrainer._compute_loss``'s per-token formulas, written out as TRL has them, on TRL's own
``get_gamma_weights``) vs ``ppokernels.compat.trl.grpo_loss``. Skipped when the trainer is not
installed. [B, T] with right padding and holes in the mask.

Bytes per token (fp32 data, fp32 mask): forward reads log_prob, old_log_prob, advantages and the
mask (16 B); backward reads them again and writes the gradient (20 B).
"""

import pytest
import torch

from ppokernels.bench._common import run

SHAPES = {"tiny": [(4, 64)], "cpu": [(64, 2048)], "llm": [(256, 4096), (1024, 8192)]}
VERL_MODES = [
    "gspo",
    "sapo",
    "gpg",
    "cispo",
    "geo_mean",
    "dppo_tv",
    "dppo_kl",
    "dro",
    "clip_cov",
    "kl_cov",
    "bypass_mode",  # the default rollout_correction: sequence-level IS, ppo_clip
]
TRL_TYPES = ["cispo", "sapo", "vespo"]
CASES = [f"verl_{m}" for m in VERL_MODES] + [f"trl_{t}" for t in TRL_TYPES]


def providers(device):
    return ["trainer", "compat"]


def _verl(mode, provider):
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
    config = pytest.importorskip("verl.workers.config")
    cfg = config.ActorConfig(
        strategy="fsdp",
        rollout_n=1,
        ppo_micro_batch_size_per_gpu=1,
        clip_ratio=0.2,
        policy_loss=config.PolicyLossConfig(dro_beta=0.1),
    )
    if provider == "compat":
        from ppokernels.compat.verl.policy_losses import POLICY_LOSSES

        fn = POLICY_LOSSES[mode]
    else:
        fn = getattr(core_algos, f"compute_policy_loss_{mode}")
        if not fn.__module__.startswith("verl"):
            pytest.skip("veRL is patched in this process (its own function is not reachable)")
    return lambda old, lp, adv, m: fn(old, lp, adv, m, "token-mean", cfg)[0]


def _trl_eager(loss_type, lp, old, adv, m, eps_high=5.0):
    """TRL 1.16 GRPOTrainer._compute_loss for cispo / sapo / vespo (token level, dapo-style
    normaliser = the number of valid tokens for cispo / vespo)."""
    grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer")
    a = adv.unsqueeze(1)
    log_ratio = lp - old
    coef_1 = torch.exp(log_ratio)
    if loss_type == "cispo":
        per_token = -torch.clamp(coef_1, max=eps_high).detach() * a * lp
    elif loss_type == "sapo":
        tau = torch.where(a > 0, 1.0, 1.05)
        per_token = -torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau * a
    else:
        phi = grpo_trainer.GRPOTrainer.get_gamma_weights(a, log_ratio, m, None)
        per_token = -phi * a * lp
    if loss_type == "sapo":
        return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    return (per_token * m).sum() / m.sum().clamp(min=1.0)


def _trl(loss_type, provider):
    if provider == "trainer":
        return lambda old, lp, adv, m: _trl_eager(loss_type, lp, old, adv, m)
    import ppokernels.compat.trl as ct

    def fn(old, lp, adv, m):
        return ct.grpo_loss(
            lp, old, adv, m, loss_type=loss_type, epsilon_high=5.0, num_items_in_batch=m.sum()
        )

    return fn


@pytest.mark.parametrize("case", CASES)
def test_ppo_loss_modes(benchmark, shape, provider, device, case):
    B, T = shape
    g = torch.Generator(device=device).manual_seed(0)
    old = -(torch.rand(B, T, generator=g, device=device) * 2 + 0.01)
    lp = (old + 0.1 * torch.randn(B, T, generator=g, device=device)).clamp(max=-1e-3)
    lp.requires_grad_(True)
    lengths = torch.randint(T // 2, T + 1, (B, 1), generator=g, device=device)
    mask = (torch.arange(T, device=device)[None] < lengths).float()
    mask *= (torch.rand(B, T, generator=g, device=device) > 0.1).float()  # multi-turn holes
    trainer, name = case.split("_", 1)
    if trainer == "verl":
        adv = torch.randn(B, T, generator=g, device=device)
        fn = _verl(name, provider)
    else:
        adv = torch.randn(B, generator=g, device=device)
        fn = _trl(name, provider)

    def step():
        loss = fn(old, lp, adv, mask)
        loss.backward()
        return loss

    benchmark.group = f"ppo_policy_loss mode {case} {shape}"
    run(benchmark, step, device=device, provider=provider, bytes_moved=B * T * 36)
