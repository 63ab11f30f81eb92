"""Verifiable rewards against reference answers, for tasks made from data (``jsonl:PATH``).

Each builder takes ``answers`` (prompt -> reference answer, str) and returns a task reward
``reward(prompts, responses) -> list[float]``:

* ``exact``: 1 if the response, stripped of surrounding whitespace, equals the answer;
* ``numeric``: 1 if the last number in the response is within ``tolerance`` of the answer's
  number (GSM8K-style: the final number is the answer; ``1,234`` reads as 1234);
* ``regex``: 1 if ``re.search(pattern, response)`` matches, where ``{answer}`` in the pattern
  is the escaped answer (e.g. ``"answer is {answer}\\b"``);
* ``module:function``: the user's ``function(prompts, responses, answers) -> list[float]``
  (``answers`` aligned with ``prompts``), imported from the working directory.
"""

from __future__ import annotations

import importlib
import math
import re
import sys

REWARDS = ("exact", "numeric", "regex")
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")


def last_number(text: str) -> float | None:
    """The last number written in ``text`` (thousands separators allowed), or None."""
    found = _NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def make_reward(kind: str, answers: dict, *, tolerance: float = 1e-6, regex: str | None = None):
    """The reward ``kind`` (see the module docstring) against ``answers``."""

    def lookup(prompts):
        return [answers[p] for p in prompts]

    if kind == "exact":

        def exact(prompts, responses):
            return [
                float(r.strip() == a.strip())
                for r, a in zip(responses, lookup(prompts), strict=True)
            ]

        return exact
    if kind == "numeric":
        bad = next((a for a in answers.values() if last_number(a) is None), None)
        if bad is not None:
            raise ValueError(f"reward numeric: the answer {bad!r} holds no number")

        def numeric(prompts, responses):
            out = []
            for r, a in zip(responses, lookup(prompts), strict=True):
                x = last_number(r)
                ok = x is not None and math.isfinite(x) and abs(x - last_number(a)) <= tolerance
                out.append(float(ok))
            return out

        return numeric
    if kind == "regex":
        if not regex:
            raise ValueError("reward regex needs reward_regex=PATTERN")
        try:
            re.compile(regex.replace("{answer}", ""))
        except re.error as e:
            raise ValueError(f"reward_regex {regex!r}: {e}") from None

        def regex_match(prompts, responses):
            pats = [regex.replace("{answer}", re.escape(a)) for a in lookup(prompts)]
            return [
                float(re.search(p, r) is not None) for p, r in zip(pats, responses, strict=True)
            ]

        return regex_match
    if ":" in kind:
        fn = import_object(kind, "reward")

        def user(prompts, responses):
            return fn(prompts, responses, lookup(prompts))

        user.__qualname__ = f"{kind} (via jsonl answers)"
        user.__module__ = None
        return user
    raise ValueError(f"reward must be one of {REWARDS} or module:function, got {kind!r}")


def import_object(spec: str, what: str):
    """``module:attribute`` imported with the working directory on the path (as ``python -m``;
    the console script's ``sys.path`` lacks it)."""
    mod, _, attr = spec.partition(":")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")
    try:
        return getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{what} {spec!r}: {e}") from None
