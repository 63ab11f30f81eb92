"""The lean loop (ppokernels.rl): config errors, EOS handling, the three heads (fused, split,
naive: same loss and gradients) under every loss mode, the rollout mismatch metrics, learning on
a built-in task, resume == uninterrupted, a 2-process DDP run, the CLI.

Everything runs on CPU with tiny models and few steps (the whole file takes a couple of minutes on
2 cores)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from ppokernels.rl import ConfigError, RLConfig, Task, algorithm, register_task  # noqa: E402
from ppokernels.rl.config import LOSS_MODES  # noqa: E402
from ppokernels.rl.models import PolicyScorer  # noqa: E402
from ppokernels.rl.rollout import Batch, truncate_at_eos  # noqa: E402
from ppokernels.rl.tasks.builtin import builtin_tokenizer  # noqa: E402


def free_port() -> str:
    """A free TCP port for torchrun's rendezvous (fixed ports collide with other runs)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def torchrun(args: list, timeout: int = 240) -> subprocess.CompletedProcess:
    """2 CPU processes under torchrun; one retry when the rendezvous itself failed (a port taken
    between choosing and binding it, a gloo connection reset on a loaded machine)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for attempt in range(2):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            free_port(),
            *args,
        ]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        text = res.stdout + res.stderr
        infra = any(k in text for k in ("EADDRINUSE", "Address already in use", "Connection reset"))
        if res.returncode == 0 or not infra or attempt:
            return res
    return res


QUIET = dict(progress=False, plots=False, tensorboard=False)
VOLATILE = {"time_s", "step_time_s", "tokens_per_s", "peak_mem_mb"}


def tiny(tmp_path, **kw) -> RLConfig:
    base = dict(
        out=str(tmp_path),
        steps=2,
        batch_size=8,
        minibatch_size=8,
        micro_batch_size=4,
        ppo_epochs=1,
        sft_steps=0,
        eval_every=0,
        eval_prompts=8,
        max_new_tokens=6,
        save_every=0,
        **QUIET,
    )
    base.update(kw)
    cfg = RLConfig()
    for k, v in base.items():
        cfg.set(k, v)
    return cfg.validate()


def trainer(cfg, **kw):
    from ppokernels.rl.trainer import Trainer

    return Trainer(cfg, **kw)


# ------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "key,value,match",
    [
        ("algo", "a2c", "algo must be one of"),
        ("kl_estimator", "k7", "kl_estimator must be one of"),
        ("lr", "-1", "lr must be > 0"),
        ("top_p", "1.5", r"top_p must be in \(0, 1\]"),
        ("gamma", "2", r"gamma must be in \[0, 1\]"),
        ("clip_low", "1.5", "clip_low: .*clip_low must be"),
        ("minibatch_size", "48", "minibatch_size .* must divide the rollout batch"),
        ("micro_batch_size", "24", "micro_batch_size .* must divide minibatch_size"),
        ("dual_clip", "0.5", "dual_clip: .*dual_clip must be > 1"),
        ("agg", "mean", "agg must be one of"),
        ("head", "fast", "head must be one of"),
        ("loss_mode", "ppo2", "loss_mode must be one of"),
        ("tau_pos", "2.0", "tau_pos: .*no field 'tau_pos'"),  # a SAPO field, loss_mode=vanilla
        ("beta", "0.1", "beta: .*no field 'beta'"),
        ("rollout_is_cap", "0", "rollout_is_cap must be > 0"),
    ],
)
def test_config_bad_values(key, value, match):
    cfg = RLConfig()
    cfg.set(key, value)
    with pytest.raises(ConfigError, match=match):
        cfg.validate()


def test_config_parsing(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'stepz'"):
        RLConfig().set("stepz", 3)
    with pytest.raises(ConfigError, match="'steps' expects int"):
        RLConfig().set("steps", "many")
    with pytest.raises(ConfigError, match="'whiten_rewards' expects bool"):
        RLConfig().set("whiten_rewards", "maybe")
    with pytest.raises(ConfigError, match="key=value"):
        RLConfig().apply_overrides(["steps"])
    with pytest.raises(ConfigError, match="group_size must be >= 2"):
        RLConfig(algo="grpo", group_size=1).validate()
    cfg = RLConfig()
    cfg.apply_overrides(
        ["steps=7", "clip_high=0.28", "dual_clip=null", "adaptive_kl=true", "kl_coef=1e-3"]
    )
    assert (cfg.steps, cfg.clip_high, cfg.dual_clip, cfg.adaptive_kl) == (7, 0.28, None, True)
    assert cfg.kl_coef == 1e-3
    path = tmp_path / "c.yaml"
    path.write_text("algo: grpo\nsteps: 5\ntemperature: 0.7\n")
    cfg = RLConfig.from_file(str(path)).validate()
    assert (cfg.algo, cfg.steps, cfg.temperature, cfg.samples_per_prompt) == ("grpo", 5, 0.7, 4)
    assert cfg.prompts_per_step * cfg.samples_per_prompt == 64
    (tmp_path / "c.json").write_text(json.dumps({"algo": "ppo", "lam": 0.9}))
    assert RLConfig.from_file(str(tmp_path / "c.json")).lam == 0.9


def test_cli_errors_and_show_config(tmp_path):
    from ppokernels.cli import main

    assert main(["train", "--set", "lr=-1"]) == 2
    assert main(["train", "--set", "nope=1"]) == 2
    assert main(["train", "--algo", "rloo", "--show-config", "--set", "steps=3"]) == 0


# ------------------------------------------------------------------------------- pieces
def test_truncate_at_eos():
    eos, pad = 1, 0
    resp = torch.tensor([[5, 6, 1, 7, 1], [5, 6, 7, 8, 9], [1, 5, 5, 5, 5]])
    ids, mask, has_eos = truncate_at_eos(resp, eos, pad)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert ids.tolist() == [[5, 6, 1, 0, 0], [5, 6, 7, 8, 9], [1, 0, 0, 0, 0]]
    assert has_eos.tolist() == [True, False, True]


def _first_step(tmp_path, **kw):
    """A trainer and its first rollout batch, scored, with advantages (no update yet)."""
    cfg = tiny(tmp_path, **kw)
    tr = trainer(cfg)
    b, _ = algorithm.rollout(cfg, tr.state, tr.actors, tr.task, tr.reward)
    stats = algorithm.score(cfg, tr.actors, b)
    algorithm.advantages(cfg, tr.state, b)
    return cfg, tr, b, stats


def _head_loss_and_grads(cfg, tr, b, head: str, **loss_fields):
    """The first step's policy loss through ``head`` (old log-probs perturbed so the ratio is
    not 1 and clipping is exercised) and the gradients of the policy."""
    cfg = dataclasses.replace(cfg, head=head, **loss_fields)
    d = b.select(torch.arange(len(b)))
    m = d["mask"].float()
    d["old_logprobs"] = d["old_logprobs"] + 0.3 * torch.sin(torch.arange(m.numel()).view_as(m)) * m
    tr.policy.zero_grad(set_to_none=True)
    scorer = PolicyScorer(tr.policy, temperature=cfg.temperature, naive=head == "naive")
    den = dict(num_tokens=float(m.sum()), num_seqs=len(b))
    out = algorithm.policy_loss(cfg, scorer, d, b.prompt_len, kl_coef=0.05, **den)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in tr.policy.named_parameters() if p.grad is not None}
    return out, grads


def _same(a, b, rtol=1e-5, atol=1e-6) -> None:
    (out_a, g_a), (out_b, g_b) = a, b
    torch.testing.assert_close(out_a.loss, out_b.loss, rtol=rtol, atol=atol)
    torch.testing.assert_close(out_a.clipfrac, out_b.clipfrac)
    assert g_a.keys() == g_b.keys() and len(g_a) > 0
    for name in g_a:
        torch.testing.assert_close(g_a[name], g_b[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen2", "tiny-gpt2"])
def test_three_heads_same_first_step(tmp_path, model):
    """The first step's policy loss and gradients are the same through linear_ppo_policy_loss
    (fused), linear_logprobs + ppo_policy_loss (split) and full logits (naive), for untied
    Llama, tied Qwen2 and GPT-2, with an entropy bonus and the KL in the loss."""
    cfg, tr, b, _ = _first_step(
        tmp_path, model=model, algo="grpo", group_size=2, temperature=0.7, entropy_coef=0.01
    )
    fused, split, naive = (_head_loss_and_grads(cfg, tr, b, h) for h in ("fused", "split", "naive"))
    _same(fused, split)
    _same(fused, naive)
    # the rollout's old log-probs equal a fresh scoring pass (ratio starts at exactly 1)
    d = b.select(torch.arange(len(b)))
    with torch.no_grad():
        lp, _ = tr.scorer(d["input_ids"], d["attention_mask"], d["mask"], b.prompt_len)
    torch.testing.assert_close(lp, d["old_logprobs"], rtol=1e-5, atol=1e-5)


LOSS_FIELDS = {
    "dro": dict(beta=0.1),
    "gspo": dict(seq_logratio_max=10.0),
    "sapo": dict(tau_pos=0.9),
}


@pytest.mark.parametrize("loss_mode", LOSS_MODES)
def test_every_loss_mode_fused_equals_split(tmp_path, loss_mode):
    """Every loss mode trains through the fused head: its first-step loss and gradients are
    those of linear_logprobs + ppo_policy_loss (seq-mean aggregation, as the group methods)."""
    fields = dict(loss_mode=loss_mode, **LOSS_FIELDS.get(loss_mode, {}))
    cfg, tr, b, _ = _first_step(tmp_path, algo="grpo", group_size=2, agg="seq-mean-token-mean")
    fused = _head_loss_and_grads(cfg, tr, b, "fused", **fields)
    split = _head_loss_and_grads(cfg, tr, b, "split", **fields)
    _same(fused, split)
    row = trainer(tiny(tmp_path / "run", algo="grpo", group_size=2, steps=1, **fields)).train()[0]
    assert all(math.isfinite(row[k]) for k in ("policy_loss", "grad_norm", "clipfrac"))


def test_rollout_mismatch_metrics(tmp_path):
    """The sampler's log-probs (from generate's scores) match the trainer's at the sampling
    temperature; top-k sampling is a real mismatch the metrics show; truncated IS weights."""
    _, _, b, stats = _first_step(tmp_path / "a", temperature=0.7, sft_steps=5)
    assert stats["mismatch_logprob_abs"] < 1e-5 and stats["mismatch_ratio_outside"] == 0.0
    assert abs(stats["mismatch_kl_k3"]) < 1e-8 and "is_weights" not in b.extra
    _, _, b, stats = _first_step(tmp_path / "b", top_k=3, sft_steps=5, rollout_is_cap=2.0)
    assert stats["mismatch_logprob_abs"] > 0.05 and stats["mismatch_ratio_outside"] > 0
    w = b.extra["is_weights"]
    assert (w <= 2.0).all() and (w[~b.mask] == 0).all() and (w[b.mask] > 0).all()
    # the metrics against an independent computation
    lp, rlp, m = b.extra["old_logprobs"], b.rollout_logprobs, b.mask
    ratio = torch.exp(lp - rlp)[m]
    torch.testing.assert_close(
        torch.tensor(stats["mismatch_logprob_abs"]), (lp - rlp)[m].abs().mean()
    )
    out = ((ratio < 0.9) | (ratio > 1.1)).float().mean()
    assert stats["mismatch_ratio_outside"] == pytest.approx(float(out))
    k3 = (ratio - 1 - torch.log(ratio)).mean()  # KL(sampler || trainer), samples from the sampler
    assert stats["mismatch_kl_k3"] == pytest.approx(float(k3), rel=1e-4, abs=1e-7)
    torch.testing.assert_close(w, torch.where(m, torch.exp(lp - rlp).clamp(max=2.0), 0.0))


def test_rollout_is_weights_reach_every_head(tmp_path):
    """rollout_is_cap's weights (rollout_correction's) scale the policy loss of the fused, split
    and naive heads alike: the three agree, and differ from the loss without the weights."""
    cfg, tr, b, _ = _first_step(tmp_path, top_k=3, sft_steps=5, rollout_is_cap=2.0)
    assert "is_weights" in b.extra
    # a cap at the median ratio, so that half the tokens are truncated
    lp, rlp, m = b.extra["old_logprobs"], b.rollout_logprobs, b.mask
    cap = float(torch.exp(lp - rlp)[m].median())
    _, w = algorithm.rollout_mismatch(lp, rlp, m, cap)
    assert (w[m] < cap).any() and (w[m] == cap).any()
    b.extra["is_weights"] = w
    fused, split, naive = (_head_loss_and_grads(cfg, tr, b, h) for h in ("fused", "split", "naive"))
    _same(fused, split)
    _same(fused, naive)
    del b.extra["is_weights"]
    plain, _ = _head_loss_and_grads(cfg, tr, b, "fused")
    assert not torch.allclose(plain.loss, fused[0].loss)


def test_user_task_and_rollout_layout(tmp_path):
    """A user task (registered in code) runs through the loop; responses end at the first EOS."""
    register_task(
        Task(
            name="test_ones",
            sample_prompts=lambda rng, n: [f"{rng.randint(0, 4)}=" for _ in range(n)],
            reward=lambda prompts, responses: [r.count("1") / 6 for r in responses],
            tokenizer=builtin_tokenizer,
        )
    )
    cfg = tiny(
        tmp_path, task="test_ones", algo="rloo", batch_size=4, group_size=2, minibatch_size=4
    )
    tr = trainer(cfg)
    b, stats = algorithm.rollout(cfg, tr.state, tr.actors, tr.task, tr.reward)
    assert len(b) == 8 and b.group_index.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    eos = tr.tokenizer.eos_token_id
    resp = b.input_ids[:, b.prompt_len :]
    for row, m in zip(resp, b.mask, strict=True):
        n = int(m.sum())
        assert (row[: n - 1] != eos).all() and (row[n:] == tr.tokenizer.pad_token_id).all()
    rows = tr.train()
    assert len(rows) == 2 and "value_loss" not in rows[0]
    for key in (
        "reward_mean",
        "kl",
        "entropy",
        "clipfrac",
        "policy_loss",
        "tokens_per_s",
        "peak_mem_mb",
        "time_s",
    ):
        assert key in rows[-1]


# ------------------------------------------------------------------------------- training
def test_ppo_learns(tmp_path):
    """A seeded short PPO run on the built-in 'copy' task: the reward of the last steps is
    clearly above that of the first steps, so is the reward on validation prompts never trained
    on, and the plots, checkpoint and exported model are written."""
    cfg = tiny(
        tmp_path,
        task="copy",
        steps=30,
        batch_size=32,
        minibatch_size=16,
        micro_batch_size=16,
        ppo_epochs=2,
        sft_steps=200,
        lr=3e-3,
        critic_lr=3e-3,
        eval_every=15,
        plots=True,
        save_every=30,
    )
    rows = trainer(cfg).train()
    first = sum(r["reward_mean"] for r in rows[:5]) / 5
    last = sum(r["reward_mean"] for r in rows[-5:]) / 5
    assert last > first + 0.15, (first, last)
    assert rows[-1]["eval_reward"] > rows[0]["eval_reward_initial"] + 0.15
    for f in (
        "metrics.jsonl",
        "reward.png",
        "curves.png",
        "run_config.json",
        "checkpoint/policy.safetensors",
        "checkpoint/critic.safetensors",
        "checkpoint/state_rank0.pt",
        "model/config.json",
        "model/tokenizer.json",
    ):
        assert (tmp_path / f).exists(), f


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_resume_equals_uninterrupted(tmp_path, algo):
    kw = dict(algo=algo, steps=4, sft_steps=3, eval_every=2, seed=3)
    if algo == "grpo":
        kw.update(batch_size=4, group_size=2)
    full = trainer(tiny(tmp_path / "full", **kw)).train()

    part = trainer(tiny(tmp_path / "part", **kw))
    step = part.train_step

    def interrupt_after_two():  # what the SIGINT handler does: finish the step, save, stop
        row = step()
        if part.step == 2:
            part.request_stop()
        return row

    part.train_step = interrupt_after_two
    assert len(part.train()) == 2
    resumed = trainer(tiny(tmp_path / "part", **kw), resume=True)
    assert resumed.step == 2
    resumed.train()
    rows = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for a, b in zip(full, rows, strict=True):
        for key in set(a) - VOLATILE:
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (a["step"], key)


def test_ddp_two_processes(tmp_path):
    """torchrun with 2 CPU processes (gloo): global denominators, rank-0 logging."""
    out = tmp_path / "ddp"
    args = ["-m", "ppokernels.cli", "train", "--algo", "ppo", "--out", str(out), "--steps", "2"]
    for k, v in dict(
        batch_size=8,
        minibatch_size=8,
        micro_batch_size=4,
        ppo_epochs=1,
        sft_steps=2,
        eval_every=2,
        eval_prompts=8,
        max_new_tokens=6,
        plots="false",
        progress="false",
        tensorboard="false",
    ).items():
        args += ["--set", f"{k}={v}"]
    res = torchrun(args)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and "eval_reward" in rows[-1]
    assert (out / "checkpoint" / "state_rank1.pt").exists()


def test_pretrained_path_and_reward_model(tmp_path):
    """--model and reward_model take Hugging Face directories (AutoModelForCausalLM +
    AutoTokenizer, AutoModelForSequenceClassification)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from ppokernels.rl.models import tiny_config

    tok = builtin_tokenizer()
    cfg = tiny_config("gpt2", len(tok), hidden=32, layers=1)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    rm_cfg = tiny_config("llama", len(tok), hidden=32, layers=1)
    rm_cfg.num_labels = 1
    AutoModelForSequenceClassification.from_config(rm_cfg).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    run = tiny(
        tmp_path / "out",
        model=str(tmp_path / "lm"),
        reward_model=str(tmp_path / "rm"),
        steps=1,
        eval_every=1,
    )
    rows = trainer(run).train()
    assert len(rows) == 1 and "eval_reward" in rows[0]
    assert rows[0]["reward_mean"] != 0.0  # the reward model's logits, not the task reward


DDP_SCRIPT = """
import sys, torch, torch.distributed as dist
from ppokernels.rl import RLConfig
from ppokernels.rl.trainer import Trainer
cfg = RLConfig(out=sys.argv[1], algo=sys.argv[2], steps=2, batch_size=4, group_size=2,
               minibatch_size=4, micro_batch_size=2, ppo_epochs=1, sft_steps=2, eval_every=0,
               progress=False, plots=False, tensorboard=False)
tr = Trainer(cfg)
tr.train()
models = [tr.policy] + ([tr.critic] if tr.critic is not None else [])
sums = torch.tensor([sum(p.double().sum() for p in m.parameters()) for m in models])
gathered = [torch.zeros_like(sums) for _ in range(2)]
dist.all_gather(gathered, sums)
assert torch.equal(gathered[0], gathered[1]), gathered  # DDP kept the replicas identical
tr.close()
"""


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_ddp_replicas_stay_identical(tmp_path, algo):
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    res = torchrun([str(script), str(tmp_path / "out"), algo])
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]


def test_ppo_advantages_and_kl_controller():
    cfg = RLConfig(whiten_rewards=False, whiten_advantages=False, gamma=1.0, lam=1.0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    ids = torch.zeros(2, 5, dtype=torch.long)
    b = Batch(ids, ids, mask, 1, ["a", "b"], ["", ""], mask.any(1), torch.arange(2))
    b.scores = torch.tensor([2.0, -1.0])
    b.extra.update(kl=torch.full((2, 4), 0.5) * mask, values=torch.zeros(2, 4))
    st = type("State", (), {"kl_coef": 0.1})()
    algorithm.advantages(cfg, st, b)
    # the score sits on the last valid token, each valid token pays 0.1 * 0.5
    want = torch.tensor([[1.85, 1.9, 1.95, 0], [-1.05, 0, 0, 0]])
    torch.testing.assert_close(b.extra["returns"], want)
    torch.testing.assert_close(b.extra["advantages"], want)
    cfg = RLConfig(adaptive_kl=True, kl_coef=0.1, kl_target=1.0, kl_horizon=100)
    coef = algorithm.adapted_kl_coef(cfg, 0.1, 5.0, 10)  # KL far above target: +20% x 10/100
    assert coef == pytest.approx(0.1 * 1.02)
    assert algorithm.adapted_kl_coef(cfg, coef, 1.0, 10) == pytest.approx(0.1 * 1.02)
