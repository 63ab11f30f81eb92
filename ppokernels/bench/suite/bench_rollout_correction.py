"""rollout_correction forward (the outputs are constants): ppokernels kernels vs the reference
and vs each trainer's own code on the same inputs and configuration.

Providers: "reference", "ppokernels-<backend>", "verl" (veRL 0.9.1
``compute_rollout_correction_and_rejection_mask``: token TIS at 2.0, rejection by token_k3 and
seq_mean_k1, every metric), "trl" (TRL 1.16's own lines of
``GRPOTrainer._generate_and_score_completions``: token_truncate ratio and its sampling metrics).
Bytes per token: two log-probs and a bool mask read, the weights (4 B) and mask (1 B) written.
"""

import inspect
import math
import textwrap
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

import ppokernels
from ppokernels.bench._common import ppokernels_providers, run

SHAPES = {"tiny": [(4, 64)], "cpu": [(64, 2048), (256, 4096)], "llm": [(256, 4096), (1024, 8192)]}
CRITERIA = {"token_k3": 0.2, "seq_mean_k1": (math.log(0.8), math.log(1.25))}


def providers(device):
    return ["reference", *ppokernels_providers(device), "verl", "trl"]


def _trl_ratio_code():
    """TRL's ratio and metric lines, compiled once (run as TRL's own code)."""
    from trl.trainer import grpo_trainer

    src = inspect.getsource(grpo_trainer.GRPOTrainer._generate_and_score_completions).splitlines()

    def block(start, end):
        i = next(k for k, line in enumerate(src) if start in line)
        j = next(k for k, line in enumerate(src) if k > i and end in line)
        return textwrap.dedent("\n".join(src[i:j]))

    ratio = block(
        "# Compute the importance sampling ratio when using vLLM", "# Compute the per-token"
    )
    metrics = block("delta = torch.abs(old_per_token_logps", "output = {")
    code = ratio + "\nif True:\n" + textwrap.indent(metrics, "    ")
    return compile(code, "trl_grpo_trainer", "exec"), grpo_trainer


def _fn(provider, old, rollout, mask):
    if provider == "verl":
        h = pytest.importorskip("verl.trainer.ppo.rollout_corr_helper")
        return lambda: h.compute_rollout_correction_and_rejection_mask(
            old, rollout, mask, "token", 2.0, False, "token_k3,seq_mean_k1", "0.2,0.8_1.25"
        )
    if provider == "trl":
        pytest.importorskip("trl")
        code, grpo = _trl_ratio_code()
        trainer = SimpleNamespace(
            use_vllm=True,
            vllm_importance_sampling_correction=True,
            vllm_importance_sampling_mode="token_truncate",
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
    backend = "reference" if provider == "reference" else provider.removeprefix("ppokernels-")
    kw = dict(level="token", mode="truncate", bounds=(None, 2.0), criteria=CRITERIA)
    return lambda: ppokernels.rollout_correction(old, rollout, mask, backend=backend, **kw)


def test_rollout_correction(benchmark, shape, provider, device):
    g = torch.Generator().manual_seed(0)
    old = (-torch.rand(shape, generator=g) * 3).to(device)
    rollout = old + 0.1 * torch.randn(shape, generator=g).to(device)
    mask = (torch.rand(shape, generator=g) > 0.1).to(device)
    benchmark.group = f"rollout_correction forward {shape}"
    run(
        benchmark,
        _fn(provider, old, rollout, mask),
        device=device,
        provider=provider,
        bytes_moved=old.numel() * (4 + 4 + 1 + 4 + 1),
    )
