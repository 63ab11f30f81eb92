"""rollout_correction forward (the outputs are constants) against each trainer's own code, like
for like: per trainer one configuration, run by the trainer, by the ppokernels op called with the
same options, and by the ppokernels.compat drop-in.

Configurations (case ``<trainer>-<mode>``):

- ``verl-token_tis_rs``: veRL 0.9.1 ``verl/trainer/ppo/rollout_corr_helper.py``
  ``compute_rollout_correction_and_rejection_mask`` (token TIS at 2.0, rejection by token_k3 and
  seq_mean_k1, every metric of that function) vs the op with the same bounds and criteria.
- ``trl-token_truncate`` / ``trl-sequence_mask``: TRL 1.16's own lines of
  ``trl/trainer/grpo_trainer.py`` ``GRPOTrainer._generate_and_score_completions`` (the ratio of
  ``vllm_importance_sampling_mode`` at ``clip_max=3.0`` and its ``sampling/*`` metrics; no
  rejection criterion) vs the op with no criterion.
- ``openrlhf-token_clip``: OpenRLHF 0.11.2's own lines of ``openrlhf/models/loss.py``
  ``PolicyLoss.forward`` for ``is_correction_level="token"``, ``mode="clip"``, threshold
  (0.5, 5.0) (the coefficient, the filter fraction and ``vllm_kl``; without the final
  ``loss = coef * loss``, which is the loss's), vs the op with those bounds.

Providers: "trainer" (the trainer's code, the baseline of the group), "ppokernels-<backend>"
(the op: weights, rejection mask and its whole metric set), "compat" (the drop-in, which returns
what the trainer's code returns). Bytes per token: two fp32 log-probs and a bool mask read, the
weights (4 B) and mask (1 B) written.
"""

import ast
import importlib.util
import inspect
import math
import os
import textwrap
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

import ppokernels
from ppokernels.bench._common import ppokernels_providers, run

SHAPES = {"tiny": [(4, 64)], "cpu": [(64, 2048), (256, 4096)], "llm": [(256, 4096), (1024, 8192)]}

# The op's options of each configuration (see the module docstring).
CASES = {
    "verl-token_tis_rs": dict(
        level="token",
        mode="truncate",
        bounds=(None, 2.0),
        criteria={"token_k3": 0.2, "seq_mean_k1": (math.log(0.8), math.log(1.25))},
    ),
    "trl-token_truncate": dict(
        level="token", mode="truncate", bounds=(None, 3.0), logratio_clamp=None
    ),
    "trl-sequence_mask": dict(
        level="sequence_sum", mode="mask", bounds=(None, 3.0), logratio_clamp=None
    ),
    "openrlhf-token_clip": dict(
        level="token", mode="truncate", bounds=(0.5, 5.0), logratio_clamp=None
    ),
}


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        metafunc.parametrize("case", list(CASES))


def providers(device):
    return ["trainer", *ppokernels_providers(device), "compat"]


# ------------------------------------------------------------------ the trainers' own code
def _block(src: list[str], start: str, end: str, *, inclusive=False) -> str:
    """The dedented lines of ``src`` from the one containing ``start`` to the next containing
    ``end`` (excluded, or included with ``inclusive``)."""
    i = next(k for k, line in enumerate(src) if start in line)
    j = next(k for k, line in enumerate(src) if k > i and end in line)
    return textwrap.dedent("\n".join(src[i : j + 1 if inclusive else j]))


def _trl(mode, old, rollout, mask):
    """TRL's ratio and metric lines, compiled once and run as TRL's own code."""
    grpo = pytest.importorskip("trl.trainer.grpo_trainer")
    src = inspect.getsource(grpo.GRPOTrainer._generate_and_score_completions).splitlines()
    ratio = _block(
        src, "# Compute the importance sampling ratio when using vLLM", "# Compute the per-token"
    )
    metrics = _block(src, "delta = torch.abs(old_per_token_logps", "output = {")
    code = compile(ratio + "\nif True:\n" + textwrap.indent(metrics, "    "), "trl_grpo", "exec")
    trainer = SimpleNamespace(
        use_vllm=True,
        vllm_importance_sampling_correction=True,
        vllm_importance_sampling_mode=mode,
        vllm_importance_sampling_clip_min=None,
        vllm_importance_sampling_clip_max=3.0,
        _metrics=defaultdict(lambda: defaultdict(list)),
        accelerator=SimpleNamespace(gather=lambda t: t.reshape(1)),
    )
    ns = dict(
        self=trainer,
        torch=torch,
        math=math,
        completion_mask=mask,
        tool_mask=None,
        old_per_token_logps=old,
        sampling_per_token_logps=rollout,
        device=old.device,
        nanmin=grpo.nanmin,
        nanmax=grpo.nanmax,
        mode="train",
    )
    return lambda: exec(code, ns)  # noqa: S102


def _openrlhf_source(module: str) -> str:
    """The text of an OpenRLHF module, read without importing the package (its ``models``
    package imports deepspeed and flash-attn)."""
    spec = importlib.util.find_spec("openrlhf")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("openrlhf is not installed")
    path = os.path.join(spec.submodule_search_locations[0], *module.split(".")) + ".py"
    with open(path) as f:
        return f.read()


def _openrlhf(old, rollout, mask):
    """OpenRLHF's IS lines of ``PolicyLoss.forward`` (token, clip, (0.5, 5.0)), run as its own
    code with its ``masked_mean``."""
    utils = _openrlhf_source("models.utils")
    fn = next(n for n in ast.parse(utils).body if getattr(n, "name", None) == "masked_mean")
    ns = {"torch": torch, "Optional": __import__("typing").Optional}
    exec(compile(ast.Module([fn], []), "openrlhf_utils", "exec"), ns)  # noqa: S102
    src = _openrlhf_source("models.loss").splitlines()
    body = _block(
        src, "low, high = self.is_correction_threshold", "vllm_kl = masked_mean(", inclusive=True
    )
    body = "\n".join(ln for ln in body.splitlines() if ln.strip() != "loss = coef * loss")
    code = compile(body, "openrlhf_loss", "exec")
    ns.update(
        self=SimpleNamespace(
            is_correction_threshold=(0.5, 5.0),
            is_correction_level="token",
            is_correction_gating="ratio",
            is_correction_mode="clip",
        ),
        old_log_probs=old,
        rollout_log_probs=rollout,
        action_mask=mask,
    )
    return lambda: exec(code, ns)  # noqa: S102


def _trainer(case, old, rollout, mask):
    trainer, mode = case.split("-", 1)
    if trainer == "verl":
        h = pytest.importorskip("verl.trainer.ppo.rollout_corr_helper")
        return lambda: h.compute_rollout_correction_and_rejection_mask(
            old, rollout, mask, "token", 2.0, False, "token_k3,seq_mean_k1", "0.2,0.8_1.25"
        )
    if trainer == "trl":
        return _trl(mode, old, rollout, mask)
    return _openrlhf(old, rollout, mask)


def _compat(case, old, rollout, mask):
    trainer, mode = case.split("-", 1)
    if trainer == "verl":
        from ppokernels.compat.verl import rollout_corr

        return lambda: rollout_corr.compute_rollout_correction_and_rejection_mask(
            old, rollout, mask, "token", 2.0, False, "token_k3,seq_mean_k1", "0.2,0.8_1.25"
        )
    if trainer == "trl":
        from ppokernels.compat.trl import vllm_importance_sampling_ratio

        return lambda: vllm_importance_sampling_ratio(old, rollout, mask, mode=mode, clip_max=3.0)
    from ppokernels.compat.openrlhf import PolicyLoss

    loss = PolicyLoss(is_correction_level="token", is_correction_mode="clip")
    return lambda: loss._is_weights(old, rollout, mask)


def _fn(provider, case, old, rollout, mask):
    if provider == "trainer":
        return _trainer(case, old, rollout, mask)
    if provider == "compat":
        return _compat(case, old, rollout, mask)
    backend = provider.removeprefix("ppokernels-")
    kw = CASES[case]
    return lambda: ppokernels.rollout_correction(old, rollout, mask, backend=backend, **kw)


def test_rollout_correction(benchmark, shape, case, provider, device):
    g = torch.Generator().manual_seed(0)
    old = (-torch.rand(shape, generator=g) * 3).to(device)
    rollout = old + 0.1 * torch.randn(shape, generator=g).to(device)
    mask = (torch.rand(shape, generator=g) > 0.1).to(device)
    benchmark.group = f"rollout_correction {case} {shape}"
    run(
        benchmark,
        _fn(provider, case, old, rollout, mask),
        device=device,
        provider=provider,
        bytes_moved=old.numel() * (4 + 4 + 1 + 4 + 1),
    )
