#!/usr/bin/env bash
# The GPU machine's stack on this CPU machine (Python 3.12, torch 2.11, triton 3.6, transformers
# 5.17; .ci/requirements-gpu-stack.txt), and at the same time the check that the package works when
# installed non-editable: build a copy of the tree with `pip install .` into a Python 3.12 venv, run
# the whole test suite against the installed package (the copy's ppokernels/ is moved away so
# nothing imports the source tree), then `ppokernels bench` from outside any checkout.
#
# The venv (about 5 GB: torch +cu130 pulls the CUDA libraries) is cached under
# ~/.cache/ppokernels-ci/, keyed by the requirements files.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY312="${PY312:-$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")/versions/3.12.1/bin/python}"
[ -x "$PY312" ] || PY312="$(command -v python3.12)"
KEY="$(cat "$ROOT/.ci/requirements-gpu-stack.txt" "$ROOT/requirements-compat.txt" "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)"
VENV="$HOME/.cache/ppokernels-ci/gpu-stack-$KEY"
WORK="$(mktemp -d /tmp/ppk-gpu-stack.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
export PPOKERNELS_CI=1 PIP_DISABLE_PIP_VERSION_CHECK=1

if [ ! -x "$VENV/bin/python" ] || [ ! -f "$VENV/.complete" ]; then
    echo "== creating $VENV"
    rm -rf "$VENV"
    "$PY312" -m venv "$VENV"
    "$VENV/bin/pip" install -q -r "$ROOT/.ci/requirements-gpu-stack.txt" setuptools wheel ninja
    touch "$VENV/.complete"
fi
PY="$VENV/bin/python"
"$PY" -c "import sys, torch, triton, numpy, transformers; print('gpu stack: python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__, 'transformers', transformers.__version__)"

echo "== non-editable install of a copy of the tree"
mkdir -p "$WORK/src"
(cd "$ROOT" && git ls-files -co --exclude-standard -z | xargs -0 tar -cf - --ignore-failed-read) | tar -xf - -C "$WORK/src"
# CPU kernels; the CUDA kernels are compile-checked against this torch's headers by tests/test_nvcc.py
(cd "$WORK/src" && PPOKERNELS_BUILD_CUDA=0 MAX_JOBS="${MAX_JOBS:-2}" "$PY" -m pip install -q --no-build-isolation ".[all]")
"$PY" -m pip install -q --no-deps -r "$ROOT/requirements-compat.txt"
mv "$WORK/src/ppokernels" "$WORK/src/ppokernels.source"
(cd /tmp && "$PY" -c "import ppokernels, os; assert 'site-packages' in ppokernels.__file__, ppokernels.__file__; print('installed:', ppokernels.__file__)")
"$VENV/bin/pip" show ppokernels | grep -E "^(Version|Requires):"

echo "== whole test suite against the installed package"
(cd "$WORK/src" && "$VENV/bin/pytest" tests -q -p no:cacheprovider -rs)

echo "== ppokernels bench from outside any checkout"
(cd /tmp && "$VENV/bin/ppokernels" bench --preset quick --ops gae --out "$WORK/bench")
"$PY" - "$WORK/bench/results.json" <<'PYEOF'
import json, sys
res = json.load(open(sys.argv[1]))
recs = res["results"]
ok = [r for r in recs if r.get("op") == "gae" and r.get("median_ms") is not None]
assert ok, f"no gae timings in results.json: {recs[:3]}"
print(f"bench from the installed package: {len(ok)} gae records")
PYEOF
