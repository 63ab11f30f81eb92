"""Tasks: where prompts come from and how responses are scored.

A task is a :class:`Task`: a prompt sampler, a reward function on decoded text, and optionally a
tokenizer and supervised examples for a warm-up. Plug in your own::

    from ppokernels.rl import Task, register_task

    def reward(prompts, responses):          # lists of str -> list of float
        return [float("42" in r) for r in responses]

    register_task(Task(
        name="answer42",
        sample_prompts=lambda rng, n: [f"Q{rng.randint(0, 9)}: " for _ in range(n)],
        reward=reward,
    ))
    # then: ppokernels train --task answer42 --model Qwen/Qwen2.5-0.5B ...
    # or, without registering: --task my_module:my_task (an importable Task object)

Or score with a reward model: ``--set reward_model=<path>`` loads an
``AutoModelForSequenceClassification`` and uses its logit 0 on ``prompt + response``.

Built-in tasks need no download: a character tokenizer, prompts generated in code, a programmatic
reward, and a supervised warm-up on noisy demonstrations (right only ``SFT_RIGHT`` of the time,
random but well-formed otherwise), like an SFT model before RLHF: it emits the format and EOS and
sometimes the answer, and RL has to make the right answer the policy's choice.
"""

from __future__ import annotations

import importlib
import random
from collections.abc import Callable
from dataclasses import dataclass

from ppokernels.rl.models import char_tokenizer

PromptSampler = Callable[[random.Random, int], list]
RewardFn = Callable[[list, list], list]


@dataclass
class Task:
    """name; ``sample_prompts(rng, n) -> list[str]``; ``reward(prompts, responses) ->
    list[float]`` (responses decoded up to, not including, EOS); ``tokenizer()`` builds the
    tokenizer of built-in models (None: the model's own, via AutoTokenizer); ``sft_example(rng) ->
    (prompt, response)`` for the warm-up (None: no warm-up); ``eval_prompts(n)`` a fixed
    held-out set (default: ``sample_prompts`` with a fixed seed different from training)."""

    name: str
    sample_prompts: PromptSampler
    reward: RewardFn
    tokenizer: Callable | None = None
    sft_example: Callable | None = None
    eval_prompts: Callable | None = None
    description: str = ""

    def held_out(self, n: int) -> list:
        if self.eval_prompts is not None:
            return list(self.eval_prompts(n))
        return list(self.sample_prompts(random.Random(987654321), n))


TASKS: dict = {}


def register_task(task: Task) -> Task:
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """A registered task by name, or ``module:attribute`` naming a Task object (or a function
    returning one)."""
    if name in TASKS:
        return TASKS[name]
    if ":" in name:
        mod, attr = name.split(":", 1)
        obj = getattr(importlib.import_module(mod), attr)
        task = obj() if callable(obj) and not isinstance(obj, Task) else obj
        if not isinstance(task, Task):
            raise ValueError(f"task {name!r} is not a ppokernels.rl.Task")
        return task
    raise ValueError(
        f"unknown task {name!r}; built-in: {', '.join(sorted(TASKS))} "
        "(or module:attribute of your own Task)"
    )


class RewardModelScorer:
    """Scores ``prompt + response`` with an ``AutoModelForSequenceClassification`` (logit 0)."""

    def __init__(self, path: str, device: str = "cpu"):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(path)
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(path).to(device).eval()
        self.device = device

    def __call__(self, prompts, responses):
        texts = [p + r for p, r in zip(prompts, responses, strict=True)]
        enc = self.tok(texts, return_tensors="pt", padding=True).to(self.device)
        with self.torch.no_grad():
            return self.model(**enc).logits[:, 0].float().tolist()


# ------------------------------------------------------------------------------- built-ins
DIGITS = "01234"
SFT_RIGHT = 0.25  # fraction of warm-up demonstrations that are correct
CHARS = "0123456789abcdefghij=:"


def _tok():
    return char_tokenizer(CHARS)


def _rand(rng: random.Random, k: int, alphabet: str = DIGITS) -> str:
    return "".join(rng.choice(alphabet) for _ in range(k))


# reverse: "3014=" -> "4103". The warm-up teaches "k characters then EOS" with random
# characters; RL has to discover the reversal from a per-position reward.
def _reverse_prompts(rng, n):
    return [_rand(rng, rng.randint(3, 5)) + "=" for _ in range(n)]


def _reverse_reward(prompts, responses):
    out = []
    for p, r in zip(prompts, responses, strict=True):
        want = p[:-1][::-1]
        hits = sum(a == b for a, b in zip(want, r, strict=False))
        out.append(hits / max(len(want), len(r)))
    return out


def _reverse_sft(rng):
    (p,) = _reverse_prompts(rng, 1)
    return p, p[:-1][::-1] if rng.random() < SFT_RIGHT else _rand(rng, len(p) - 1)


register_task(
    Task(
        "reverse",
        _reverse_prompts,
        _reverse_reward,
        _tok,
        _reverse_sft,
        description="reverse a 3-5 digit string; reward: fraction of positions right",
    )
)


# repeat: "c:" -> "cccc" (the letter exactly REPEAT times). Reward: right letters in the right
# places over max(REPEAT, length), so neither a short nor a long answer scores 1. The default
# task: the reward climbs from ~0.2 to ~0.9 within a few dozen steps.
REPEAT = 4


def _repeat_prompts(rng, n):
    return [rng.choice("abcdefghij") + ":" for _ in range(n)]


def _repeat_reward(prompts, responses):
    return [
        sum(c == p[0] for c in r[:REPEAT]) / max(len(r), REPEAT)
        for p, r in zip(prompts, responses, strict=True)
    ]


def _repeat_sft(rng):
    (p,) = _repeat_prompts(rng, 1)
    if rng.random() < SFT_RIGHT:
        return p, p[0] * REPEAT
    return p, _rand(rng, rng.randint(2, 6), "abcdefghij")


register_task(
    Task(
        "repeat",
        _repeat_prompts,
        _repeat_reward,
        _tok,
        _repeat_sft,
        description="repeat the prompt letter 4 times; reward: fraction of positions right",
    )
)


# sum: "3+4=" -> "7". Exact-match reward (sparse); the warm-up emits a random number.
def _sum_prompts(rng, n):
    return [f"{rng.randint(0, 9)}+{rng.randint(0, 9)}=" for _ in range(n)]


def _sum_reward(prompts, responses):
    return [float(r == str(int(p[0]) + int(p[2]))) for p, r in zip(prompts, responses, strict=True)]


def _sum_sft(rng):
    (p,) = _sum_prompts(rng, 1)
    right = str(int(p[0]) + int(p[2]))
    return p, right if rng.random() < SFT_RIGHT else str(rng.randint(0, 18))


register_task(
    Task(
        "sum",
        _sum_prompts,
        _sum_reward,
        lambda: char_tokenizer(CHARS + "+"),
        _sum_sft,
        description="add two digits; reward 1 for the exact sum",
    )
)
