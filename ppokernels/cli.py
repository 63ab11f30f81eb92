"""Command line: ``ppokernels info | train | bench``."""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import sys

# Public functions that run on the kernels of another op (the backend is chosen for that op).
_KERNEL_OP = {
    "masked_mean": "masked_moments",
    "masked_var": "masked_moments",
    "linear_ppo_policy_loss": "ppo_policy_loss",
}


def _info(args: argparse.Namespace) -> int:
    import torch

    import ppokernels
    from ppokernels import _backend

    facts = {
        "ppokernels": ppokernels.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
    }
    facts.update(_backend.info())
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    width = max(len(k) for k in facts)
    for key, value in facts.items():
        print(f"{key:<{width}}  {value}")
    print("\nbackends per op (cpu / cuda):")
    for name in ppokernels.__all__:  # the ops: the functions, less info (classes are outputs)
        if name == "info" or not inspect.isfunction(getattr(ppokernels, name)):
            continue
        row = []
        for dev in ("cpu", "cuda"):
            opts = ["reference"]
            if _backend.has_cpp(dev, _KERNEL_OP.get(name, name)):
                opts.append("cpp")
            if _backend.has_triton(dev):
                opts.append("triton")
            row.append(",".join(opts))
        print(f"  {name:<22} {row[0]:<26} {row[1]}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ppokernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions and which backends are built")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(fn=_info)
    # Each subcommand module adds its parser: add_parser(subparsers) sets defaults(fn=...).
    for module in ("ppokernels.rl.cli", "ppokernels.rl.apply", "ppokernels.bench"):
        try:
            mod = __import__(module, fromlist=["add_parser"])
        except ModuleNotFoundError as e:
            if e.name is None or not module.startswith(e.name):
                raise
            continue
        mod.add_parser(sub)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
