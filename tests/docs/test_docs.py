"""Every fenced Python block of README.md and docs/*.md runs, and every op page names every argument
of its ops.

Conventions (CONTRIBUTING.md, "Docs"):

- A page's ```python blocks run in order in one fresh interpreter, in an empty temporary folder,
  sharing one namespace: a block may use what an earlier block of the same page defined.
- ``<!-- docs-test: skip REASON -->`` on the line before a block: the block is not run (a fragment
  that needs a cluster or a trainer's launcher). REASON is required.
- ``<!-- docs-test: setup`` ... ``-->``: code run before the next block and not shown on the
  rendered page, for what a reader has already (a trained model, their own prompts).
"""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import ppokernels

ROOT = Path(__file__).resolve().parents[2]
# README.md is absent where CI copies tests/ and docs/ beside an installed wheel
PAGES = [p for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))] if p.exists()]
FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```", re.M | re.S)
MARK = re.compile(r"<!-- docs-test: (skip|setup)(.*?)-->\s*$", re.S)


def blocks(text: str) -> list[dict]:
    """The page's Python blocks: [{"code", "line", "skip", "setup"}], in page order."""
    out = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n")
        start = before.rfind("<!-- docs-test:")  # the last marker, only if it ends right here
        mark = MARK.fullmatch(before[start:]) if start >= 0 and before.endswith("-->") else None
        kind = mark.group(1) if mark else None
        body = mark.group(2) if mark else ""
        if kind == "skip" and not body.strip():
            raise ValueError(f"docs-test: skip without a reason before line {_line(text, m)}")
        out.append(
            {
                "code": m.group(1),
                "line": _line(text, m) + 1,
                "skip": kind == "skip",
                "setup": body.strip("\n") + "\n" if kind == "setup" else "",
            }
        )
    return out


def _line(text: str, m: re.Match) -> int:
    return text.count("\n", 0, m.start()) + 1


RUNNER = """
import json, sys
page, items = sys.argv[1], json.load(open(sys.argv[2]))
ns = {"__name__": "__main__"}
for it in items:
    if it["setup"]:
        exec(compile(it["setup"], f"{page} setup before line {it['line']}", "exec"), ns)
    exec(compile(it["code"], f"{page} block at line {it['line']}", "exec"), ns)
    print(f"ok: {page} block at line {it['line']}", flush=True)
"""


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_python_blocks_run(page, tmp_path):
    items = [b for b in blocks(page.read_text()) if not b["skip"]]
    if not items:
        return  # a page without Python blocks (shell only) has nothing to run
    (tmp_path / "blocks.json").write_text(json.dumps(items))
    # the blocks import the ppokernels this test imported (a checkout or an installed wheel)
    home = str(Path(ppokernels.__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([home, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, page.relative_to(ROOT).as_posix(), "blocks.json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("ok: ") == len(items), proc.stdout


# op page -> the public functions it documents
OP_PAGES = {
    "token_logprobs.md": ["token_logprobs"],
    "linear_logprobs.md": ["linear_logprobs"],
    "linear_ppo_policy_loss.md": ["linear_ppo_policy_loss"],
    "ppo_loss.md": ["ppo_policy_loss", "value_loss"],
    "kl_penalty.md": ["kl_penalty"],
    "gae.md": ["gae", "discounted_returns"],
    "rollout_correction.md": ["rollout_correction"],
    "advantages.md": ["masked_mean", "masked_var", "masked_whiten", "group_advantages"],
}


def test_every_op_has_a_page_naming_every_argument():
    ops = {
        n for n in ppokernels.__all__ if n != "info" and inspect.isfunction(getattr(ppokernels, n))
    }
    documented = {op for names in OP_PAGES.values() for op in names}
    assert documented == ops, (ops - documented, "have no page;", documented - ops, "are no ops")
    for page, names in OP_PAGES.items():
        text = (ROOT / "docs" / page).read_text()
        for name in names:
            assert f"`{name}(" in text or f"`{name}`" in text, (page, name)
            for arg in inspect.signature(getattr(ppokernels, name)).parameters:
                assert f"`{arg}`" in text, f"docs/{page} does not describe {name}'s `{arg}`"


def test_markers_are_read():
    text = (
        "<!-- docs-test: skip needs a cluster -->\n```python\nraise SystemExit\n```\n"
        "<!-- docs-test: setup\nx = 1\n-->\n```python\nassert x == 1\n```\n"
        "```python\nprint(x)\n```\n"
    )
    got = blocks(text)
    assert [b["code"] for b in got] == ["raise SystemExit\n", "assert x == 1\n", "print(x)\n"]
    assert [b["skip"] for b in got] == [True, False, False]
    assert got[1]["setup"] == "x = 1\n" and got[2]["setup"] == ""
    with pytest.raises(ValueError, match="without a reason"):
        blocks("<!-- docs-test: skip -->\n```python\npass\n```\n")
