"""Compiles every registered Triton kernel ahead of time for sm_80 and sm_90 (no GPU needed).

Run in a subprocess by tests/test_triton_aot.py, without TRITON_INTERPRET (the interpreter
replaces @triton.jit kernels by objects the compiler cannot take). Prints one JSON line.
"""

import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import ppokernels  # noqa: E402,F401  (imports every ppokernels.triton module)
from ppokernels.triton._common import AOT_SPECS  # noqa: E402

archs = [int(a) for a in sys.argv[1:]] or [80, 90]
done, failed = [], []
for kernel, signature, constexprs in AOT_SPECS:
    name = f"{kernel.fn.__module__}.{kernel.fn.__name__}{constexprs}"
    for arch in archs:
        try:
            src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32))
            assert compiled.asm["cubin"], "empty cubin"
            done.append(f"{name}@sm_{arch}")
        except Exception as e:  # report every failure, not only the first
            failed.append(f"{name}@sm_{arch}: {type(e).__name__}: {str(e)[:2000]}")
print(json.dumps({"compiled": done, "failed": failed}))
