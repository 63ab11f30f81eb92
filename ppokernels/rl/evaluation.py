"""Evaluation of a policy on a split of a task (used by the loop and by ``ppokernels eval``), and
the one-line summary of a run."""

from __future__ import annotations

import torch

from ppokernels.rl.rollout import generate
from ppokernels.rl.tasks import check_rewards, reward_name


@torch.no_grad()
def evaluate(
    model,
    tokenizer,
    prompts: list,
    reward_fn,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = True,
    batch_size: int = 64,
    source: str | None = None,
) -> dict:
    """Generate one response per prompt (in batches of ``batch_size``) and score it.

    Returns ``{"reward_mean": mean over prompts, "results": [{"prompt", "response", "reward"}]}``.
    Rewards are checked (:func:`check_rewards`); errors name ``source`` (default: the function).
    """
    source = source or reward_name(reward_fn)
    if not prompts:
        raise ValueError("evaluate: no prompts")
    results = []
    for i in range(0, len(prompts), batch_size):
        chunk = list(prompts[i : i + batch_size])
        b = generate(
            model,
            tokenizer,
            chunk,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            greedy=greedy,
        )
        scores = check_rewards(reward_fn(chunk, b.responses), len(chunk), source)
        results += [
            {"prompt": p, "response": r, "reward": s}
            for p, r, s in zip(chunk, b.responses, scores, strict=True)
        ]
    mean = sum(r["reward"] for r in results) / len(results)
    return {"reward_mean": mean, "results": results}


def repeat_to(prompts: list, n: int) -> list:
    """Cycle a short split up to ``n`` prompts (sampled evaluation of a 1-prompt split is still
    an average over ``n`` samples)."""
    if not prompts or len(prompts) >= n:
        return list(prompts)
    return [prompts[i % len(prompts)] for i in range(n)]


class HeldOut:
    """The loop's validation and test evaluation (rank 0): ``eval_prompts`` prompts of each
    split, sampled at the training temperature (short splits cycled) or greedy with
    ``eval_greedy``; validation every ``eval_every`` steps and at the end, test at the end."""

    def __init__(self, cfg, task, reward_fn, source: str):
        n = cfg.eval_prompts
        self.cfg, self.reward_fn, self.source = cfg, reward_fn, source
        self.prompts = {s: task.split(s, n) if n else [] for s in ("validation", "test")}
        self.initial: dict = {}

    def run(self, model, tokenizer, split: str) -> float:
        cfg = self.cfg
        prompts = self.prompts[split]
        if not cfg.eval_greedy:
            prompts = repeat_to(prompts, cfg.eval_prompts)
        return evaluate(
            model,
            tokenizer,
            prompts,
            self.reward_fn,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            greedy=cfg.eval_greedy,
            batch_size=max(64, len(prompts)),
            source=self.source,
        )["reward_mean"]

    def _due_splits(self, step: int, final: bool) -> list:
        """(split, metrics key) pairs evaluated at ``step``: validation every ``eval_every``
        steps and at the end, test at the end (nothing when ``eval_every`` is 0)."""
        every, out = self.cfg.eval_every, []
        if every and self.prompts["validation"] and (step % every == 0 or final):
            out.append(("validation", "eval_reward"))
        if every and final and self.prompts["test"]:
            out.append(("test", "test_reward"))
        return out

    def is_due(self, step: int, *, final: bool) -> bool:
        """Whether :meth:`due` evaluates anything at ``step`` (every process can ask)."""
        return bool(self._due_splits(step, final))

    def due(self, model, tokenizer, step: int, *, final: bool) -> dict:
        """``eval_reward`` when due, ``test_reward`` at the final step (rank 0 only calls)."""
        return {
            key: self.run(model, tokenizer, split) for split, key in self._due_splits(step, final)
        }

    def before_rl(self, model, tokenizer) -> dict:
        """Both splits before the first RL step (``*_initial`` in the first metrics row)."""
        if self.cfg.eval_every:
            for split, key in (("validation", "eval_reward"), ("test", "test_reward")):
                if self.prompts[split]:
                    self.initial[key] = self.run(model, tokenizer, split)
        return self.initial


def _mean(rows: list, key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def summary_line(rows: list, initial: dict, out: str) -> str:
    """``train reward a -> b`` (first and last step for runs of up to 5 steps, otherwise the
    mean of the first and of the last 5), then validation and test before -> after."""
    n = len(rows)
    if n == 1:
        msg = f"train reward {rows[0]['reward_mean']:.3f} (1 step)"
    elif n <= 5:
        msg = (
            f"train reward {rows[0]['reward_mean']:.3f} (step {rows[0]['step']}) -> "
            f"{rows[-1]['reward_mean']:.3f} (step {rows[-1]['step']})"
        )
    else:
        msg = (
            f"train reward (mean of 5 steps) {_mean(rows[:5], 'reward_mean'):.3f} -> "
            f"{_mean(rows[-5:], 'reward_mean'):.3f}"
        )
    for key, label in (("eval_reward", "validation"), ("test_reward", "test")):
        vals = [r[key] for r in rows if key in r]
        if vals:
            before = initial.get(key)
            msg += f"; {label} reward {'' if before is None else f'{before:.3f} -> '}{vals[-1]:.3f}"
    msg += f"; {rows[-1]['time_s']:.0f} s over {n} step{'s' if n > 1 else ''}"
    return f"{msg}; metrics, plots, checkpoint and model in {out}"
