"""Built-in tasks: no download, a character tokenizer, prompts generated in code, a programmatic
reward, and a supervised warm-up on noisy demonstrations (right only ``SFT_RIGHT`` of the time,
random but well-formed otherwise), like an SFT model before RLHF: it emits the format and EOS and
sometimes the answer, and RL has to make the right answer the policy's choice.

Splits: ``copy``, ``reverse`` and ``sum`` hold out fixed hash buckets of their prompt space
(:func:`ppokernels.rl.tasks.hash_split`), so their test prompts are never seen in training or
in the warm-up; ``repeat`` (10 prompts) holds out one letter each for validation and test.
"""

from __future__ import annotations

import random

from ppokernels.rl.models import char_tokenizer
from ppokernels.rl.tasks.base import Task, hash_split

DIGITS = "01234"
LETTERS = "abcdefghij"
SFT_RIGHT = 0.25  # fraction of warm-up demonstrations that are correct
CHARS = "0123456789abcdefghij=:"


def builtin_tokenizer():
    """The character tokenizer of the built-in tasks (digits, letters, '=' and ':')."""
    return char_tokenizer(CHARS)


def _rand(rng: random.Random, k: int, alphabet: str = DIGITS) -> str:
    return "".join(rng.choice(alphabet) for _ in range(k))


def _positions_right(want: str, got: str) -> float:
    """Right characters in the right places over max(len(want), len(got)): neither a short nor
    a long answer scores 1."""
    return sum(a == b for a, b in zip(want, got, strict=False)) / max(len(want), len(got), 1)


def _train_prompt(sample):
    """A warm-up prompt from the training split only (held-out prompts stay unseen)."""

    def draw(rng):
        while True:
            (p,) = sample(rng, 1)
            if hash_split(p) == "train":
                return p

    return draw


# copy (the default): "cfa:" -> "cfa". 1000 prompts; 100 validation and 100 test prompts are
# never trained on, so the test reward measures whether the policy learnt to copy.
def _copy_prompts(rng, n):
    return [_rand(rng, 3, LETTERS) + ":" for _ in range(n)]


def _copy_reward(prompts, responses):
    return [_positions_right(p[:-1], r) for p, r in zip(prompts, responses, strict=True)]


_copy_train = _train_prompt(_copy_prompts)


def _copy_sft(rng):
    p = _copy_train(rng)
    return p, p[:-1] if rng.random() < SFT_RIGHT else _rand(rng, rng.randint(2, 4), LETTERS)


COPY_TASK = Task(
    "copy",
    _copy_prompts,
    _copy_reward,
    builtin_tokenizer,
    _copy_sft,
    description="copy 3 letters; reward: fraction of positions right; test prompts unseen",
)


# reverse: "3014=" -> "4103". The warm-up teaches "k characters then EOS" with random
# characters; RL has to discover the reversal from a per-position reward.
def _reverse_prompts(rng, n):
    return [_rand(rng, rng.randint(3, 5)) + "=" for _ in range(n)]


def _reverse_reward(prompts, responses):
    return [_positions_right(p[:-1][::-1], r) for p, r in zip(prompts, responses, strict=True)]


_reverse_train = _train_prompt(_reverse_prompts)


def _reverse_sft(rng):
    p = _reverse_train(rng)
    return p, p[:-1][::-1] if rng.random() < SFT_RIGHT else _rand(rng, len(p) - 1)


REVERSE_TASK = Task(
    "reverse",
    _reverse_prompts,
    _reverse_reward,
    builtin_tokenizer,
    _reverse_sft,
    description="reverse a 3-5 digit string; reward: fraction of positions right",
)


# repeat: "c:" -> "cccc" (the letter exactly REPEAT times). Only 10 prompts: "i:" is the
# validation split and "j:" the test split, so both measure a letter never prompted in training.
REPEAT = 4


def _repeat_prompts(rng, n):
    return [rng.choice(LETTERS[:8]) + ":" for _ in range(n)]


def _repeat_reward(prompts, responses):
    return [
        sum(c == p[0] for c in r[:REPEAT]) / max(len(r), REPEAT)
        for p, r in zip(prompts, responses, strict=True)
    ]


def _repeat_sft(rng):
    (p,) = _repeat_prompts(rng, 1)
    if rng.random() < SFT_RIGHT:
        return p, p[0] * REPEAT
    return p, _rand(rng, rng.randint(2, 6), LETTERS)


REPEAT_TASK = Task(
    "repeat",
    _repeat_prompts,
    _repeat_reward,
    builtin_tokenizer,
    _repeat_sft,
    description="repeat the prompt letter 4 times; reward: fraction of positions right",
    validation=["i:"],
    test=["j:"],
)


# sum: "3+4=" -> "7". Exact-match reward (sparse); the warm-up emits a random number.
def _sum_prompts(rng, n):
    return [f"{rng.randint(0, 9)}+{rng.randint(0, 9)}=" for _ in range(n)]


def _sum_reward(prompts, responses):
    return [float(r == str(int(p[0]) + int(p[2]))) for p, r in zip(prompts, responses, strict=True)]


_sum_train = _train_prompt(_sum_prompts)


def _sum_sft(rng):
    p = _sum_train(rng)
    right = str(int(p[0]) + int(p[2]))
    return p, right if rng.random() < SFT_RIGHT else str(rng.randint(0, 18))


SUM_TASK = Task(
    "sum",
    _sum_prompts,
    _sum_reward,
    lambda: char_tokenizer(CHARS + "+"),
    _sum_sft,
    description="add two digits; reward 1 for the exact sum",
)

BUILTIN_TASKS = (COPY_TASK, REVERSE_TASK, REPEAT_TASK, SUM_TASK)
