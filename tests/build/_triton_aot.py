"""Compiles every Triton kernel configuration ahead of time for the given archs (no GPU needed).

Run in a subprocess by tests/build/test_triton_aot.py and tests/build/test_triton_audit.py, without
TRITON_INTERPRET (the interpreter replaces @triton.jit kernels by objects the compiler cannot
take). The configurations are the ``AOT`` tables of the kernel modules (every input dtype, every
constexpr switch, the runtime ``num_warps`` / ``num_stages``). Prints one JSON line:
``{"compiled": [...], "failed": [...], "kernels": {name@sm_X: {n_regs, n_spills, shared, wgmma,
has_dot}}}``.
"""

import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from ppokernels.triton import MODULES  # noqa: E402


def specs():
    out = []
    for mod in MODULES:
        out += importlib.import_module(mod).AOT
    return out


def compile_one(index: int, arch: int) -> tuple[str, dict | None, str | None]:
    spec = specs()[index]
    name = f"{spec.kernel.fn.__module__}.{spec.name}@sm_{arch}"
    try:
        src = ASTSource(fn=spec.kernel, signature=spec.signature, constexprs=spec.constexprs)
        opts = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
        assert compiled.asm["cubin"], "empty cubin"
        md = compiled.metadata
        assert md.num_warps == spec.num_warps and md.num_stages == spec.num_stages, md
        info = {
            **_usage(compiled.asm["cubin"]),
            "shared": md.shared,
            "num_warps": md.num_warps,
            "num_stages": md.num_stages,
            "has_dot": "tt.dot" in compiled.asm["ttir"],
            "wgmma": "wgmma" in compiled.asm["ptx"],
        }
        return name, info, None
    except Exception as e:  # report every failure, not only the first
        return name, None, f"{name}: {type(e).__name__}: {str(e)[:2000]}"


def _usage(cubin: bytes) -> dict:
    """Registers and stack bytes per thread (the stack frame holds register spills) of the cubin,
    from Triton's bundled ``cuobjdump --dump-resource-usage``."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {"n_regs": None, "n_spills": None}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [tool, "--dump-resource-usage", f.name], capture_output=True, text=True
        )
    regs, stack = re.search(r"REG:(\d+)", out.stdout), re.search(r"STACK:(\d+)", out.stdout)
    return {
        "n_regs": int(regs.group(1)) if regs else None,
        "n_spills": int(stack.group(1)) if stack else None,
    }


def main(argv: list[str]) -> None:
    archs = [int(a) for a in argv if a.isdigit()] or [80, 90]
    only_dot = "--dot-only" in argv
    jobs = [(i, a) for i, s in enumerate(specs()) for a in archs]
    if only_dot:
        # kernels with a tl.dot in their own source or in a jitted helper of their module that
        # they call (a module may also hold kernels without one, e.g. a GEMM-free epilogue)
        def has_dot(kernel) -> bool:
            module = sys.modules[kernel.fn.__module__]
            helpers = [
                name
                for name, obj in vars(module).items()
                if hasattr(obj, "fn") and "tl.dot" in inspect.getsource(obj.fn)
            ]
            own = inspect.getsource(kernel.fn)
            return "tl.dot" in own or any(f"{name}(" in own for name in helpers)

        jobs = [(i, a) for i, a in jobs if has_dot(specs()[i].kernel)]
    workers = max(1, min(len(jobs), os.cpu_count() or 1))
    done, failed, kernels = [], [], {}
    with ProcessPoolExecutor(workers) as pool:
        for name, info, err in pool.map(compile_one, *zip(*jobs, strict=True)):
            if err:
                failed.append(err)
            else:
                done.append(name)
                kernels[name] = info
    print(json.dumps({"compiled": done, "failed": failed, "kernels": kernels}))


if __name__ == "__main__":
    main(sys.argv[1:])
