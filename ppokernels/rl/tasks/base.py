"""Tasks: where prompts come from (train / validation / test splits) and how responses are scored.

A task is a :class:`Task`: a reward function on decoded text, the prompts of its three splits,
and optionally a tokenizer and supervised examples for a warm-up. Plug in your own::

    from ppokernels.rl import Task

    def reward(prompts, responses):          # lists of str -> list of float
        return [float("42" in r) for r in responses]

    task = Task.from_prompts("answer42", [f"Q{i}: " for i in range(500)], reward)
    # then: ppokernels train --task my_module:task --model Qwen/Qwen2.5-0.5B ...

The three splits never share a prompt:

* lists: ``Task(name, reward=..., train=[...], validation=[...], test=[...])`` (any iterable of
  str, e.g. a ``datasets`` column); :meth:`Task.from_prompts` splits one list with a fixed seed;
* a generator: ``Task(name, sample_prompts=f, reward=...)`` with ``f(rng, n) -> list[str]``;
  without explicit ``validation``/``test`` a fixed 10% / 10% of all possible prompts (chosen by a
  CRC-32 of the text, so the same on every machine and process) is held out for each, and the
  training sampler rejects them. With explicit lists, training rejects exactly those prompts.

Or score with a reward model: ``--set reward_model=<path>`` loads an
``AutoModelForSequenceClassification`` and uses its logit 0 on ``prompt + response``.
"""

from __future__ import annotations

import math
import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass

PromptSampler = Callable[[random.Random, int], list]
RewardFn = Callable[[list, list], list]
SPLITS = ("train", "validation", "test")
HELD_OUT_PERCENT = {"test": 10, "validation": 10}  # hash buckets [0, 10) and [10, 20)
SPLIT_SEEDS = {"train": 11, "validation": 22, "test": 33}


class RewardError(ValueError):
    """A reward function returned something other than one finite float per response."""


def hash_split(prompt: str) -> str:
    """The split a generated prompt belongs to: CRC-32 of its UTF-8 text mod 100 (stable across
    runs and machines, unlike ``hash``): [0, 10) test, [10, 20) validation, else train."""
    bucket = zlib.crc32(prompt.encode("utf-8")) % 100
    if bucket < HELD_OUT_PERCENT["test"]:
        return "test"
    if bucket < HELD_OUT_PERCENT["test"] + HELD_OUT_PERCENT["validation"]:
        return "validation"
    return "train"


@dataclass
class Task:
    """``name``; ``reward(prompts, responses) -> list[float]`` (responses decoded up to, not
    including, EOS); prompts from ``train``/``validation``/``test`` lists and/or
    ``sample_prompts(rng, n) -> list[str]`` (see the module docstring for how splits are made);
    ``tokenizer()`` builds the tokenizer of built-in models (None: the model's own, via
    AutoTokenizer); ``sft_example(rng) -> (prompt, response)`` for the warm-up (None: none)."""

    name: str
    sample_prompts: PromptSampler | None = None
    reward: RewardFn | None = None
    tokenizer: Callable | None = None
    sft_example: Callable | None = None
    description: str = ""
    train: list | None = None
    validation: list | None = None
    test: list | None = None

    def __post_init__(self):
        if not callable(self.reward):
            raise TypeError(f"Task {self.name!r}: reward must be callable(prompts, responses)")
        for split in SPLITS:
            prompts = getattr(self, split)
            if prompts is not None:
                setattr(self, split, _as_prompt_list(self.name, split, prompts))
        if self.sample_prompts is None and not self.train:
            raise ValueError(f"Task {self.name!r}: give sample_prompts(rng, n) or a train list")
        self._explicit = self.validation is not None or self.test is not None
        self._held = set(self.validation or []) | set(self.test or [])
        self._test = set(self.test or [])
        if self.train is not None:
            if self._explicit:
                overlap = sorted(self._held & set(self.train))
                if overlap:
                    raise ValueError(
                        f"Task {self.name!r}: {len(overlap)} prompt(s) are both in train and in "
                        f"validation/test, e.g. {overlap[0]!r}"
                    )
            else:  # one list: hold out its hash buckets
                self.validation = [p for p in self.train if hash_split(p) == "validation"]
                self.test = [p for p in self.train if hash_split(p) == "test"]
                self.train = [p for p in self.train if hash_split(p) == "train"]
                self._explicit, self._held = True, set(self.validation) | set(self.test)
                self._test = set(self.test)
        both = set(self.validation or []) & set(self.test or [])
        if both:
            raise ValueError(
                f"Task {self.name!r}: validation and test share {len(both)} prompt(s), "
                f"e.g. {sorted(both)[0]!r}"
            )

    @classmethod
    def from_prompts(
        cls, name: str, prompts, reward: RewardFn, *, validation=0.1, test=0.1, seed=0, **kw
    ) -> Task:
        """Split one collection of prompts (duplicates removed) with a fixed seed: fractions
        (or counts) for validation and test, the rest for training."""
        items = sorted(set(_as_prompt_list(name, "prompts", prompts)))
        random.Random(seed).shuffle(items)
        nv = validation if isinstance(validation, int) else math.ceil(validation * len(items))
        nt = test if isinstance(test, int) else math.ceil(test * len(items))
        return cls(
            name,
            reward=reward,
            validation=items[:nv],
            test=items[nv : nv + nt],
            train=items[nv + nt :],
            **kw,
        )

    def split_of(self, prompt: str) -> str:
        if self._explicit:
            if prompt in self._held:
                return "test" if prompt in self._test else "validation"
            return "train"
        return hash_split(prompt)

    def sample_train(self, rng: random.Random, n: int) -> list:
        """``n`` training prompts (with replacement), never one of the held-out splits."""
        if self.train:
            return [rng.choice(self.train) for _ in range(n)]
        out: list = []
        for _ in range(1000):
            out += [p for p in self.sample_prompts(rng, n) if self.split_of(p) == "train"]
            if len(out) >= n:
                return out[:n]
        raise ValueError(f"task {self.name!r}: sample_prompts makes almost no training prompts")

    def split(self, name: str, n: int | None = None) -> list:
        """Up to ``n`` distinct prompts of split ``name`` (train | validation | test), the same on
        every call (lists in order; generated splits drawn with a fixed seed per split)."""
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        fixed = getattr(self, name)
        if fixed is not None or (self._explicit and name != "train"):
            return list(fixed or [])[:n]
        want = n or 256
        rng, out, seen = random.Random(SPLIT_SEEDS[name]), [], set()
        for _ in range(200):  # rejection sampling with a cap: a small prompt space ends early
            for p in self.sample_prompts(rng, max(want, 64)):
                if p not in seen and self.split_of(p) == name:
                    seen.add(p)
                    out.append(p)
            if len(out) >= want:
                break
        return out[:want]


def _as_prompt_list(task: str, split: str, prompts) -> list:
    if isinstance(prompts, str) or callable(prompts):
        raise TypeError(f"Task {task!r}: {split} must be a list of prompt strings")
    items = list(prompts)
    bad = [p for p in items if not isinstance(p, str)]
    if bad:
        raise TypeError(f"Task {task!r}: {split} holds a non-string prompt {bad[0]!r}")
    return items


def check_rewards(values, n: int, source: str) -> list:
    """One finite float per response, or a :class:`RewardError` naming ``source``, the index
    and the value (raised before the rollout reaches any optimizer step)."""
    if hasattr(values, "tolist"):  # a tensor or an array
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise RewardError(f"{source} returned {type(values).__name__}; expected a list of floats")
    if len(values) != n:
        raise RewardError(f"{source} returned {len(values)} rewards for {n} responses")
    out = []
    for i, v in enumerate(values):
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if not ok:
            raise RewardError(f"{source}: reward {i} is {v!r}; expected a finite float")
        out.append(float(v))
    return out


def reward_name(fn) -> str:
    """A readable name for error messages: ``module.function``."""
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    mod = getattr(fn, "__module__", None)
    return f"reward function {mod + '.' if mod else ''}{name}"


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
