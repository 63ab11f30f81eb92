"""``ppokernels generate`` and ``ppokernels eval``: use a trained model (``OUT/model``) or any
Hugging Face causal-LM folder outside the loop.

* ``generate``: responses to ``--prompt`` (repeatable) and/or the lines of ``--prompts-file``,
  one JSON object per line: ``{"prompt": ..., "response": ...}`` (the response up to EOS).
* ``eval``: mean task reward on a held-out split of a task (a ``jsonl:PATH`` task takes the
  run's field names and reward, or ``--reward``), as JSON:
  ``{"model", "task", "split", "n", "reward_mean", "results": [{"prompt", "response", "reward"}]}``.

Greedy decoding unless ``--temperature`` > 0. When the folder sits in a run directory, the run's
``run_config.json`` supplies the default ``--max-new-tokens``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def add_parser(subparsers) -> None:
    g = subparsers.add_parser(
        "generate",
        help="sample responses from a trained model (OUT/model) or any HF causal LM",
        description="Print one JSON line per prompt: {prompt, response}.",
    )
    _common(g)
    g.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    g.add_argument("--prompts-file", help="a text file with one prompt per line")
    g.set_defaults(fn=run_generate)

    e = subparsers.add_parser(
        "eval",
        help="mean task reward of a model on a held-out split (JSON)",
        description="Evaluate a model on the validation or test split of a task.",
    )
    _common(e)
    e.add_argument("--task", required=True, help="built-in task, jsonl:PATH or module:attribute")
    e.add_argument(
        "--reward",
        help="jsonl tasks: exact | numeric | regex | module:function (default: the run's)",
    )
    e.add_argument("--split", choices=("test", "validation"), default="test")
    e.add_argument("--n", type=int, default=128, help="at most this many prompts (default 128)")
    e.add_argument("--out", help="also write the JSON to this file")
    e.set_defaults(fn=run_eval)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a save_pretrained folder, e.g. runs/x/model")
    p.add_argument("--max-new-tokens", type=int, help="default: the run's, else 32")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")


def _load(args: argparse.Namespace, command: str):
    """(model, tokenizer, max_new_tokens) or a one-line error."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ppokernels.rl.models import from_pretrained

    if args.temperature < 0 or args.temperature != args.temperature:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but no CUDA device is available")
    model = from_pretrained(AutoModelForCausalLM, args.model, dtype=torch.float32)
    tok = from_pretrained(AutoTokenizer, args.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    max_new = args.max_new_tokens or _run_default(args.model, "max_new_tokens") or 32
    if max_new < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {max_new}")
    return model.to(args.device).eval(), tok, max_new


def _run_default(model_dir: str, key: str):
    path = os.path.join(os.path.dirname(os.path.abspath(model_dir)), "run_config.json")
    try:
        with open(path) as f:
            return json.load(f).get(key)
    except (OSError, ValueError):
        return None


def _jsonl_options(args) -> dict:
    """A ``jsonl:PATH`` task's options: the run's (``run_config.json`` beside the model), then
    ``--reward``; none for other tasks."""
    if not args.task.startswith("jsonl:"):
        return {}
    keys = ("prompt_field", "answer_field", "split_field", "reward_tolerance", "reward_regex")
    opts = {k: v for k in keys if (v := _run_default(args.model, k)) is not None}
    opts["reward"] = args.reward or _run_default(args.model, "reward")
    return opts


def _sampling(args) -> dict:
    greedy = args.temperature == 0
    return dict(greedy=greedy, temperature=args.temperature if not greedy else 1.0)


def _fail(command: str, e: Exception) -> int:
    print(f"ppokernels {command}: {e}", file=sys.stderr)
    return 2


def run_generate(args: argparse.Namespace) -> int:
    from ppokernels.rl.rollout import generate

    prompts = list(args.prompt)
    try:
        if args.prompts_file:
            with open(args.prompts_file) as f:
                prompts += [line.rstrip("\n") for line in f if line.strip()]
        if not prompts:
            raise ValueError("give --prompt TEXT or --prompts-file FILE")
        model, tok, max_new = _load(args, "generate")
    except (OSError, ValueError) as e:
        return _fail("generate", e)
    for i in range(0, len(prompts), 64):
        chunk = prompts[i : i + 64]
        b = generate(model, tok, chunk, max_new_tokens=max_new, **_sampling(args))
        for p, r in zip(chunk, b.responses, strict=True):
            print(json.dumps({"prompt": p, "response": r}))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from ppokernels.rl.evaluation import evaluate
    from ppokernels.rl.tasks import RewardError, get_task

    try:
        task = get_task(args.task, **_jsonl_options(args))
        prompts = task.split(args.split, args.n)
        if not prompts:
            raise ValueError(f"task {task.name!r} has no {args.split} prompts")
        model, tok, max_new = _load(args, "eval")
        res = evaluate(model, tok, prompts, task.reward, max_new_tokens=max_new, **_sampling(args))
    except (OSError, ValueError, RewardError) as e:
        return _fail("eval", e)
    report = dict(model=args.model, task=task.name, split=args.split, n=len(prompts), **res)
    text = json.dumps(report, indent=2)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0
