#!/usr/bin/env bash
# The wheels, built once and tested as a user gets them (the stable-ABI promise: one binary wheel
# for every torch >= 2.11):
#
#   1. build   `make wheel` in a copy of the tree with the GPU machine's stack (Python 3.12, torch
#              2.11 +cu130, the oldest supported torch; nvcc here, so _C_cuda is compiled too):
#              dist/ppokernels-*-cp311-abi3-*.whl and dist/ppokernels-*-py3-none-any.whl
#   2. gates   no undefined at::/c10::/torch:: C++ symbol in either binary (nm), abi3audit clean,
#              the platform tag auditwheel grants, the wheel's size and Requires-Dist
#   3. torch 2.11 (Python 3.12, the GPU machine's stack): the binary wheel installed (no build),
#              the whole suite against it, `ppokernels bench` from outside any checkout, the
#              rehearsal of the GPU check from a checkout beside that install
#   4. torch 2.13 and 2.15 (Python 3.11): the SAME wheel, timed `pip install`, `ppokernels info`
#              (_C loaded, the CPU ISA level), the op tests on the C++ and reference paths (forced
#              scalar / avx2 levels included)
#   5. pure:   the py3-none-any wheel with torch 2.13: the suite on the reference / Triton
#              interpreter paths (PPOKERNELS_PURE=1: only the binary's tests may skip)
#
# Tests run from a copy of tests/ whose folder has no ppokernels/, so they import the installed
# package. Venvs are cached under ~/.cache/ppokernels-ci/, keyed by their requirements.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYENV_ROOT="$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"
PY312="${PY312:-$PYENV_ROOT/versions/3.12.1/bin/python}"
[ -x "$PY312" ] || PY312="$(command -v python3.12)"
PY311="${PY311:-$(command -v python3.11)}"
CACHE="$HOME/.cache/ppokernels-ci"
WORK="$(mktemp -d /tmp/ppk-wheels.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
export PPOKERNELS_CI=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
# the toolkit, not the prefix of the nvcc wrapper on PATH (/usr/local/bin/nvcc here)
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
start=$SECONDS
stamp() { echo "== [wheels $(( SECONDS - start )) s] $*"; }

# The op tests: every kernel family, the loader, the ABI gates, the ISA levels.
# (ops/test_edge_cases.py compares with veRL: it runs in step 3, where the trainers are installed.)
OP_TESTS=(ops/test_kl_penalty.py ops/test_gae.py ops/test_masked_whiten.py
  ops/test_group_advantages.py ops/test_ppo_policy_loss.py ops/test_value_loss.py
  ops/test_ppo_policy_loss_modes.py ops/test_token_logprobs.py ops/test_linear_logprobs.py
  ops/test_linear_ppo_policy_loss.py
  build/test_cpu_isa.py build/test_loading.py build/test_binary_abi.py build/test_nvcc.py)

# venv NAME PYTHON REQUIREMENT_FILE...: a cached venv with those requirements; prints its path.
venv() {
  local name=$1 py=$2
  shift 2
  local key
  key="$(cat "$@" | sha256sum | cut -c1-16)"
  local dir="$CACHE/$name-$key"
  if [ ! -x "$dir/bin/python" ] || [ ! -f "$dir/.complete" ]; then
    echo "== creating $dir" >&2
    rm -rf "$dir"
    "$py" -m venv "$dir"
    for req in "$@"; do "$dir/bin/pip" install -q -r "$req" >&2; done
    touch "$dir/.complete"
  fi
  echo "$dir"
}

# A copy of the tree (tracked and untracked-not-ignored files).
mkdir -p "$WORK/src"
(cd "$ROOT" && git ls-files -co --exclude-standard -z | xargs -0 tar -cf - --ignore-failed-read) |
  tar -xf - -C "$WORK/src"
# tests/ and benchmarks/ beside no ppokernels/: they import the installed package
mkdir -p "$WORK/t"
for d in tests benchmarks csrc docs examples pyproject.toml; do
  [ -e "$WORK/src/$d" ] && cp -r "$WORK/src/$d" "$WORK/t/"
done

stamp "1. make wheel with Python 3.12, torch 2.11 (+cu130) and nvcc"
V211="$(venv py312-torch211 "$PY312" "$ROOT/.ci/requirements-gpu-stack.txt" "$ROOT/.ci/requirements-wheel-tools.txt")"
"$V211/bin/python" -c "import sys, torch; print('build stack: python', sys.version.split()[0], 'torch', torch.__version__)"
(cd "$WORK/src" && PPOKERNELS_BUILD_CUDA=1 make wheel PYTHON="$V211/bin/python")
BIN="$(ls "$WORK"/src/dist/ppokernels-*-cp311-abi3-*.whl)"
PURE="$(ls "$WORK"/src/dist/ppokernels-*-py3-none-any.whl)"
ls -l "$BIN" "$PURE"

stamp "2. static gates"
mkdir -p "$WORK/unzipped"
(cd "$WORK/unzipped" && "$V211/bin/python" -m zipfile -e "$BIN" .)
for so in "$WORK"/unzipped/ppokernels/_C*.so; do
  bad="$(nm -D -C --undefined-only "$so" | grep -E '\b(at|c10|torch|caffe2)::' || true)"
  if [ -n "$bad" ]; then
    echo "FAIL: $(basename "$so") needs unstable torch C++ symbols:"
    echo "$bad" | head -20
    exit 1
  fi
  echo "ok: $(basename "$so") has no undefined at::/c10::/torch:: symbol" \
    "($(nm -D --undefined-only "$so" | grep -c -E 'aoti_torch_|torch_') shim symbols)"
done
[ -f "$WORK/unzipped/ppokernels/_C_cuda.abi3.so" ] || { echo "FAIL: no _C_cuda in $BIN"; exit 1; }
"$V211/bin/abi3audit" --strict --report "$BIN"
"$V211/bin/auditwheel" show "$BIN"
case "$(basename "$BIN")" in *manylinux_*) ;; *) echo "FAIL: no manylinux tag: $BIN"; exit 1 ;; esac
"$V211/bin/python" - "$BIN" <<'PYEOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    reqs = [l for l in z.read(meta).decode().splitlines() if l.startswith("Requires-Dist")]
core = [r for r in reqs if "extra ==" not in r]
print("core Requires-Dist:", core)
assert any(r.startswith("Requires-Dist: torch>=2.11") for r in core), core
PYEOF
echo "sizes: $(du -h "$BIN" | cut -f1) binary, $(du -h "$PURE" | cut -f1) pure"

stamp "3. torch 2.11 (Python 3.12): the binary wheel, the whole suite, bench from outside"
"$V211/bin/pip" install -q --force-reinstall --no-deps "$BIN"
"$V211/bin/pip" install -q "${BIN}[all]"
"$V211/bin/pip" install -q --no-deps -r "$ROOT/requirements-compat.txt"
(cd /tmp && "$V211/bin/python" -m ppokernels.cli info)
(cd "$WORK/t" && "$V211/bin/python" -m pytest tests -q -p no:cacheprovider -rs -x)
(cd /tmp && "$V211/bin/ppokernels" bench --preset quick --ops gae --out "$WORK/bench")
"$V211/bin/python" - "$WORK/bench/results.json" <<'PYEOF'
import json, sys
recs = json.load(open(sys.argv[1]))["results"]
ok = [r for r in recs if r.get("op") == "gae" and r.get("median_ms") is not None]
assert ok, f"no gae timings in results.json: {recs[:3]}"
print(f"bench from the installed wheel: {len(ok)} gae records")
PYEOF

# the GPU check's rehearsal beside this non-editable install: run from the copy of the tree (no
# binaries in its ppokernels/), every step must use the installed wheel
(cd "$WORK/src" && PYTHON="$V211/bin/python" benchmarks/gpu_check.sh --rehearse "$WORK/rehearse")
"$V211/bin/python" "$WORK/src/benchmarks/check_gpu_out.py" "$WORK/rehearse"
grep -q "site-packages/ppokernels/_C" <(tar xzOf "$WORK/rehearse/logs.tar.gz" logs/build.log) \
  || { echo "FAIL: the rehearsal did not use the installed wheel"; exit 1; }

# info --json must report _C loaded with the CPU's ISA level
check_info() {
  local py=$1
  (cd /tmp && "$py" -m ppokernels.cli info --json) > "$WORK/info.json"
  "$py" - "$WORK/info.json" <<'PYEOF'
import json, sys
f = json.load(open(sys.argv[1]))
print({k: f[k] for k in ("torch", "binary_cpu", "binary_cuda", "binary_cuda_reason", "cpu_isa")})
assert f["binary_cpu"] and f["binary_cpu_reason"] is None, f
assert f["cpu_isa"] in ("scalar", "avx2", "avx512"), f
PYEOF
}

for spec in "2.13:$ROOT/.ci/requirements-torch213.txt" "2.15:$ROOT/.ci/requirements-newest-torch.txt"; do
  ver=${spec%%:*}
  req=${spec#*:}
  stamp "4. torch $ver (Python 3.11): the same wheel, the op tests"
  V="$(venv "py311-torch${ver/./}" "$PY311" "$req" "$ROOT/.ci/requirements-test.txt")"
  "$V/bin/pip" uninstall -q -y ppokernels 2>/dev/null || true
  t0=$SECONDS
  "$V/bin/pip" install -q "$BIN"
  echo "pip install of the binary wheel under torch $ver: $(( SECONDS - t0 )) s"
  check_info "$V/bin/python"
  # the binary's paths (C++ and reference); the Triton interpreter's ran in step 3 and make test
  (cd "$WORK/t" && "$V/bin/python" -m pytest "${OP_TESTS[@]/#/tests/}" -k "not triton" -q \
    -p no:cacheprovider -rs -x)
done

stamp "5. the pure-Python wheel (torch 2.13): reference and Triton-interpreter paths"
VP="$(venv py311-pure "$PY311" "$ROOT/.ci/requirements-torch213.txt" "$ROOT/.ci/requirements-test.txt")"
"$VP/bin/pip" uninstall -q -y ppokernels 2>/dev/null || true
"$VP/bin/pip" install -q "${PURE}[all]"
"$VP/bin/pip" install -q --no-deps -r "$ROOT/requirements-compat.txt"
(cd /tmp && "$VP/bin/python" -W error::RuntimeWarning -c "import ppokernels; f = ppokernels.info(); print(f['binary_cpu_reason']); assert f['binary_cpu'] is None")
(cd "$WORK/t" && PPOKERNELS_PURE=1 "$VP/bin/python" -m pytest tests -q -p no:cacheprovider -rs -x)
stamp "wheels done"
