"""A task from a JSONL file of prompts and reference answers (``--task jsonl:PATH``).

One JSON object per line: ``{"prompt": "3+4=", "answer": "7"}`` (field names configurable; a
numeric answer such as ``7`` is read as its text),
optionally with ``"split": "train" | "validation" | "test"``; lines without it are split by the
hashed rule of the built-in tasks (:func:`~ppokernels.rl.tasks.base.hash_split`: a fixed 10% for
validation and 10% for test, the same on every machine). The reward compares each response with
its prompt's answer (:mod:`~ppokernels.rl.tasks.rewards`). A malformed line (not JSON, not an
object, a missing or non-string field, an unknown split, a prompt given two different answers)
is a :class:`JsonlError` naming the file and the line; no line is skipped.

The warm-up (``sft_steps``) trains on the training split's (prompt, answer) pairs; the built-in
tiny models get a character tokenizer made of the file's characters.
"""

from __future__ import annotations

import json
import random

from ppokernels.rl.tasks.base import SPLITS, Task, hash_split
from ppokernels.rl.tasks.rewards import make_reward


class JsonlError(ValueError):
    """A malformed JSONL task file (the message names the file and the line)."""


def read_jsonl(path: str, *, prompt_field: str, answer_field: str, split_field: str) -> dict:
    """``{prompt: (answer, split)}`` of every line; blank lines are allowed, nothing else is
    skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise JsonlError(f"jsonl task {path}: {e.strerror or e}") from None
    rows: dict = {}
    first_line: dict = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise JsonlError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise JsonlError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        for key in (prompt_field, answer_field):
            if key not in obj:
                raise JsonlError(f"{where}: missing field {key!r} (fields: {sorted(obj)})")
        prompt, answer = obj[prompt_field], obj[answer_field]
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = str(answer)  # {"answer": 72} as GSM8K-style files write numbers
        for key, value in ((prompt_field, prompt), (answer_field, answer)):
            if not isinstance(value, str) or not value:
                raise JsonlError(f"{where}: field {key!r} must be a non-empty string")
        split = obj.get(split_field, hash_split(prompt))
        if split not in SPLITS:
            raise JsonlError(
                f"{where}: field {split_field!r} must be one of {SPLITS}, got {split!r}"
            )
        if prompt in rows and rows[prompt] != (answer, split):
            raise JsonlError(
                f"{where}: prompt {prompt!r} already appears on line {first_line[prompt]} with "
                f"another answer or split"
            )
        rows[prompt] = (answer, split)
        first_line.setdefault(prompt, n)
    if not rows:
        raise JsonlError(f"jsonl task {path}: no lines")
    return rows


def jsonl_task(
    path: str,
    *,
    reward: str | None = None,
    prompt_field: str = "prompt",
    answer_field: str = "answer",
    split_field: str = "split",
    reward_tolerance: float = 1e-6,
    reward_regex: str | None = None,
) -> Task:
    """The :class:`Task` of a JSONL file (see the module docstring); ``reward`` defaults to
    ``exact``."""
    rows = read_jsonl(
        path, prompt_field=prompt_field, answer_field=answer_field, split_field=split_field
    )
    answers = {p: a for p, (a, _) in rows.items()}
    splits = {s: [p for p, (_, sp) in rows.items() if sp == s] for s in SPLITS}
    if not splits["train"]:
        raise JsonlError(f"jsonl task {path}: no training prompts")
    try:
        fn = make_reward(reward or "exact", answers, tolerance=reward_tolerance, regex=reward_regex)
    except ValueError as e:
        raise JsonlError(f"jsonl task {path}: {e}") from None
    chars = sorted({c for p, a in answers.items() for c in p + a})
    train = splits["train"]

    def tokenizer():
        from ppokernels.rl.models import char_tokenizer

        return char_tokenizer("".join(chars))

    def sft_example(rng: random.Random):
        p = rng.choice(train)
        return p, answers[p]

    return Task(
        f"jsonl:{path}",
        reward=fn,
        tokenizer=tokenizer,
        sft_example=sft_example,
        description=f"{len(rows)} prompts from {path}, reward {reward or 'exact'}",
        **splits,
    )
