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


def ops_and_backends() -> dict[str, dict[str, list[str]]]:
    """Every public op (the functions of ``ppokernels.__all__`` but ``info``) -> device -> the
    backends that run it on this machine, in the order ``backend="auto"`` tries them ("cpp",
    "triton", "reference"). A device this machine lacks (no CUDA GPU) gets an empty list."""
    import torch

    import ppokernels
    from ppokernels import _backend

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    table = {}
    for name in ppokernels.__all__:
        if name == "info" or not inspect.isfunction(getattr(ppokernels, name)):
            continue  # classes: an exception and the ops' output tuples
        kernel_op = _KERNEL_OP.get(name, name)
        row = {"cpu": [], "cuda": []}
        for dev in devices:
            cpp = _backend.has_cpp(dev, kernel_op)
            triton = _backend.has_triton(dev)
            order = ["cpp", "triton"]
            if dev == "cuda" and _backend.fastest_gpu(kernel_op) == "triton":
                order.reverse()
            row[dev] = [b for b in order if {"cpp": cpp, "triton": triton}[b]] + ["reference"]
        table[name] = row
    return table


def _binary_line(side: str) -> str:
    from ppokernels import _backend

    binary = _backend.BINARIES[side]
    if binary.module is None:
        return f"not loaded: {binary.reason}"
    where = getattr(binary.module, "__file__", "?")
    isa = f"; CPU kernels at the {_backend.cpu_isa()} level" if side == "cpu" else ""
    return f"loaded, {_backend.BINARY_NAME[side]}{isa}, from {where}"


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
    ops = ops_and_backends()
    if args.json:
        print(json.dumps(dict(facts, ops=ops), indent=2))
        return 0
    gpu = facts.get("gpu") or "none (torch.cuda.is_available() is False)"
    lines = {
        "ppokernels": f"{ppokernels.__version__} from {ppokernels.__path__[0]}",
        "python, torch": f"{facts['python']}, torch {facts['torch']}, {facts['machine']}",
        "triton": f"{facts['triton'] or 'not installed'}"
        + (" (interpreter: TRITON_INTERPRET=1)" if facts["triton_interpreter"] else ""),
        "gpu": gpu,
        "ppokernels._C": _binary_line("cpu"),
        "ppokernels._C_cuda": _binary_line("cuda"),
    }
    if facts["backend_override"]:
        lines["PPOKERNELS_BACKEND"] = f"{facts['backend_override']} (replaces auto)"
    width = max(len(k) for k in lines)
    for key, value in lines.items():
        print(f"{key:<{width}}  {value}")
    name_w = max(len(n) for n in ops)
    print("\nops and the backends that run them here (auto takes the first):")
    print(f"  {'op':<{name_w}}  {'CPU tensors':<26} CUDA tensors")
    for name, row in ops.items():
        cuda = ", ".join(row["cuda"]) if torch.cuda.is_available() else "(no CUDA device here)"
        print(f"  {name:<{name_w}}  {', '.join(row['cpu']):<26} {cuda}")
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
