"""What a build of the C++ kernels costs per op, for comparing two builds in one run.

    python benchmarks/abi_cost.py TREE [TREE ...] [--rounds 2] [--out FILE.json]

Each TREE is a checkout whose ppokernels/ holds a built binary (an in-place build: `python
setup.py build_ext --inplace`). The trees are timed in turn, in fresh interpreters, `--rounds`
times (A B A B: drift of the machine shows as a difference between rounds, not between trees).
Written for the stable-ABI migration (the ATen build against the stable-ABI build); the numbers
are in benchmarks/README.md's notes. Ops: one CPU kernel (kl_penalty forward + backward, 256 x
4096), the gae scan (forward, 256 x 1024), one linear head (linear_logprobs forward + backward,
N = 512, H = 512, V = 32768, fp32) and the per-call cost at a small shape (ppo_policy_loss
forward + backward, 4 x 64). Time: the minimum over repeats of the median over calls.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

# Run in the child: times the ops of the ppokernels found first on sys.path.
CHILD = r"""
import json, os, sys, time
# an editable install's finder would map ppokernels._C to its own tree: drop it
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
import torch
import ppokernels
from ppokernels import _backend

assert _backend.has_cpp("cpu"), "no C++ kernels in " + ppokernels.__file__
torch.manual_seed(0)


def timeit(fn, calls, repeats=7):
    for _ in range(3):
        fn()
    medians = []
    for _ in range(repeats):
        ts = []
        for _ in range(calls):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        medians.append(sorted(ts)[len(ts) // 2])
    return min(medians) * 1e3


lp = torch.randn(256, 4096, requires_grad=True)
ref, g = torch.randn(256, 4096), torch.randn(256, 4096)
kl = lambda: torch.autograd.grad(ppokernels.kl_penalty(lp, ref, backend="cpp"), lp, g)
r, v = torch.randn(256, 1024), torch.randn(256, 1024)
m = torch.ones(256, 1024, dtype=torch.bool)
gae = lambda: ppokernels.gae(r, v, m, gamma=0.99, lam=0.95, backend="cpp")
N, H, V = 512, 512, 32768
h = torch.randn(N, H, requires_grad=True)
w = (torch.randn(V, H) * 0.02).requires_grad_()
y = torch.randint(0, V, (N,))
llp = lambda: torch.autograd.grad(
    ppokernels.linear_logprobs(h, w, y, backend="cpp")[0].sum(), (h, w)
)
a = torch.randn(4, 64, requires_grad=True)
o, adv = torch.randn(4, 64), torch.randn(4, 64)
mk = torch.ones(4, 64, dtype=torch.bool)
ppo = lambda: torch.autograd.grad(ppokernels.ppo_policy_loss(a, o, adv, mk, backend="cpp").loss, a)
print(json.dumps({
    "binary": ppokernels._backend._C.__file__,
    "kl_penalty fwd+bwd 256x4096 (ms)": timeit(kl, 50),
    "gae fwd 256x1024 (ms)": timeit(gae, 50),
    "linear_logprobs fwd+bwd 512x512x32768 (ms)": timeit(llp, 3, repeats=5),
    "ppo_policy_loss fwd+bwd 4x64 (us)": timeit(ppo, 200) * 1e3,
}))
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trees", nargs="+", help="checkouts with an in-place build")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", help="write the records as JSON here")
    args = p.parse_args()
    records = []
    for rnd in range(args.rounds):
        for tree in args.trees:
            env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
            out = subprocess.run(
                [sys.executable, "-c", CHILD], env=env, cwd="/", capture_output=True, text=True
            )
            if out.returncode != 0:
                print(out.stderr, file=sys.stderr)
                return 1
            rec = {"tree": tree, "round": rnd, **json.loads(out.stdout.splitlines()[-1])}
            records.append(rec)
            print(json.dumps(rec))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
