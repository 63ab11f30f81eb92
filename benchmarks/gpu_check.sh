#!/usr/bin/env bash
# GPU check, fitted to the lent GPU machine (its limits: one command <= 600 s, at most 8 files
# of 16 MiB back, no network). One command of at most 540 s: take the binaries of the carried
# binary wheel (dist/, `make wheel` here) or else build the CUDA kernels for sm_90 only,
# run the CUDA tests, then the llm benchmarks (ours beside the competition's released code, from
# wheels carried in wheels/), each step time-boxed so that a later step still runs when an earlier
# one fails or hangs, partial results kept. Then everything is packed into OUT as 4 files:
#
#   OUT/summary.txt   each step's exit status, seconds and limit; test and benchmark counts
#   OUT/results.json  `ppokernels bench` records (machine, limits, results, failures, skips)
#   OUT/report.md     the benchmark table
#   OUT/logs.tar.gz   machine.txt, every step's log, junit.xml, the plots, raw pytest-benchmark JSON
#
#   benchmarks/gpu_check.sh OUT               on the GPU machine (PYTHONUNBUFFERED, absolute paths)
#   benchmarks/gpu_check.sh --rehearse OUT    the same script on a CPU machine within 5 minutes:
#                                             no CUDA build (the installed extension is checked),
#                                             a CPU test subset, the benchmarks at smoke sizes
#
# The competition's packages (pure Python) are installed, when wheels/ holds them, with
# `pip install --no-index --no-deps --target` into a scratch folder put on PYTHONPATH (never into
# the machine's environment); fill wheels/ with `make wheels`, carry it with run(carry=["wheels"]).
set -uo pipefail

REHEARSE=0
if [[ "${1:-}" == "--rehearse" ]]; then
  REHEARSE=1
  shift
fi
[[ $# -eq 1 ]] || { echo "usage: benchmarks/gpu_check.sh [--rehearse] OUT" >&2; exit 2; }
OUT=$(realpath -m "$1")
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ppk-gpu-check.XXXXXX")
mkdir -p "$OUT" "$WORK/logs"
# Which ppokernels every step imports, whatever way it is installed: the GPU check runs the source
# tree (its binaries come from the carried wheel or an in-place build), put first on PYTHONPATH;
# the rehearsal runs the package this Python imports outside the tree (an editable install of this
# checkout or another, or a wheel). Either way every step runs from WORK, never from the tree, so
# the tree's ppokernels/ (no binaries in a checkout beside a wheel install) cannot shadow the
# installed one, and pytest never meets two copies of one benchmark module.
if ((!REHEARSE)); then export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"; fi
cd "$WORK"

export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# sm_90 only, whatever the image sets (setup.py takes PPOKERNELS_CUDA_ARCHS)
export TORCH_CUDA_ARCH_LIST=9.0 PPOKERNELS_CUDA_ARCHS=9.0 MAX_JOBS=${MAX_JOBS:-16}
BENCH_OPS="linear_logprobs token_logprobs ppo_policy_loss value_loss kl_penalty gae \
masked_whiten group_advantages compat rl"
if ((REHEARSE)); then
  TOTAL=280  # seconds for all steps (5 minutes with start-up and packing)
  LIMITS=(machine=15 wheels=30 build=30 info=30 tests=60 bench=rest)
  BENCH_ARGS=(--preset smoke --file-timeout 90 --ops linear_logprobs token_logprobs kl_penalty)
else
  TOTAL=525  # seconds for all steps: 540 with packing; one rerun fits the 15 device minutes
  LIMITS=(machine=15 wheels=20 build=180 info=15 tests=75 bench=rest)  # bench >= 220 s
  # shellcheck disable=SC2206
  BENCH_ARGS=(--preset llm --file-timeout 150 --ops $BENCH_OPS)
  export PPK_BENCH_CASE_SECONDS=0.5  # timed rounds per case on the GPU (see ppokernels/bench)
fi
declare -A LIMIT
for kv in "${LIMITS[@]}"; do LIMIT[${kv%%=*}]=${kv#*=}; done

START=$SECONDS
SUMMARY="$WORK/steps.txt"
: > "$SUMMARY"

# steps run under `timeout` in a child bash: it needs the functions and settings below
export PY ROOT WORK REHEARSE

step() {  # step NAME CMD...: CMD within its limit (capped by what is left of TOTAL), log in WORK/logs
  local name=$1
  shift
  local left=$((TOTAL - (SECONDS - START))) want=${LIMIT[$name]}
  [[ $want == rest ]] && want=$left  # the last step gets whatever the others left
  local limit=$((want < left ? want : left))
  local t0=$SECONDS rc
  if ((limit < 5)); then
    rc=skipped-no-time
  else
    timeout --signal=INT --kill-after=5 "$limit" bash -c '"$@"' bash "$@" \
      > "$WORK/logs/$name.log" 2>&1
    rc=$?
    ((rc == 124)) && rc="124(timeout)"
  fi
  printf '%-8s rc=%-14s %4ds of %4ds\n' "$name" "$rc" $((SECONDS - t0)) "$limit" | tee -a "$SUMMARY"
}

machine() {
  nvidia-smi || echo "no nvidia-smi"
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', \
torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
  nvcc --version 2>/dev/null | tail -2 || echo "no nvcc"
  echo "cpu cores: $(nproc); TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
}

wheels() {
  shopt -s nullglob
  local whl=("$ROOT"/wheels/*.whl)
  if ((${#whl[@]} == 0)); then
    echo "no wheels/*.whl: the competition's providers are skipped unless already installed"
    return 0
  fi
  # only the wheels this Python can install (an openrlhf wheel is per Python version)
  mapfile -t whl < <("$PY" - "${whl[@]}" <<'EOF'
import sys
from pip._vendor.packaging.tags import sys_tags
from pip._vendor.packaging.utils import parse_wheel_filename
ok = set(sys_tags())
for path in sys.argv[1:]:
    tags = parse_wheel_filename(path.rsplit("/", 1)[-1])[3]
    print(path) if tags & ok else print(f"skipped (another platform): {path}", file=sys.stderr)
EOF
  )
  "$PY" -m pip install -q --no-index --no-deps --target "$WORK/peers" "${whl[@]}" \
    && printf 'installed %s\n' "${whl[@]##*/}"
}

build() {
  if ((REHEARSE)); then  # no CUDA build here: the installed extension must load
    "$PY" -c "import ppokernels._C, ppokernels; print('extension', ppokernels._C.__file__)"
    return
  fi
  cd "$ROOT" || return
  # The binary wheel built on the CPU machine (`make wheel`, carried with run(carry=["dist"])):
  # its binaries go beside the sources, as an in-place build would put them; no GPU minute is
  # spent compiling. Without a wheel: build in place.
  local whl
  whl=$(ls dist/ppokernels-*-abi3-*.whl 2>/dev/null | head -1)
  if [[ -n "$whl" ]]; then
    "$PY" -m zipfile -e "$whl" "$WORK/wheel" \
      && cp "$WORK"/wheel/ppokernels/_C*.so "$WORK/wheel/ppokernels/_build_info.py" ppokernels/ \
      && echo "binaries from $whl: $(ls ppokernels/_C*.so)"
    return
  fi
  PPOKERNELS_BUILD_CUDA=1 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . \
    || PPOKERNELS_BUILD_CUDA=1 "$PY" setup.py build_ext --inplace
}

tests() {
  if ((REHEARSE)); then
    "$PY" -m pytest "$ROOT/tests/ops/test_kl_penalty.py" -q -p no:cacheprovider \
      -k "not compile and not opcheck" --junitxml="$WORK/junit.xml"
  else  # the CUDA-parametrised and CUDA-only tests (their ids contain "cuda")
    "$PY" -m pytest "$ROOT/tests" -q -p no:cacheprovider -k cuda --maxfail=20 \
      --junitxml="$WORK/junit.xml"
  fi
}

export -f machine wheels build tests
step machine machine
step wheels wheels
[[ -d "$WORK/peers" ]] && export PYTHONPATH="$WORK/peers${PYTHONPATH:+:$PYTHONPATH}"
step build build
step info "$PY" -m ppokernels.cli info --json
step tests tests
step bench "$PY" -m ppokernels.cli bench "${BENCH_ARGS[@]}" --out "$WORK/bench"

# ---- pack: at most 4 files in OUT, summary first
mode=$( ((REHEARSE)) && echo "rehearsal (CPU)" || echo "GPU")
{
  echo "ppokernels GPU check, $mode, $(date -u +%FT%TZ), $((SECONDS - START)) s of $TOTAL s"
  grep -m1 '^python ' "$WORK/logs/machine.log" 2>/dev/null
  cat "$SUMMARY"
  "$PY" - "$WORK" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
work = sys.argv[1]
try:
    s = ET.parse(f"{work}/junit.xml").getroot()
    s = s if s.tag == "testsuite" else s[0]
    print("tests: {tests} run, {failures} failed, {errors} errors, {skipped} skipped".format(**s.attrib))
except Exception as e:
    print(f"tests: no junit.xml ({e.__class__.__name__})")
try:
    r = json.load(open(f"{work}/bench/results.json"))
    print(f"bench: {len(r['results'])} timed, {len(r['failures'])} failed, {len(r['skips'])} "
          f"skipped, exit per file {r['machine'].get('exit_status')}")
    for f in r["failures"][:10]:
        print(f"  FAILED {f['nodeid']}: {f['reason'][:200]}")
except Exception as e:
    print(f"bench: no results.json ({e.__class__.__name__})")
EOF
  echo "files: summary.txt results.json report.md logs.tar.gz (logs/, junit.xml, bench plots)"
} > "$OUT/summary.txt" 2>&1
for f in results.json report.md; do
  if [[ -f "$WORK/bench/$f" ]]; then cp "$WORK/bench/$f" "$OUT/$f"; else
    echo "{\"error\": \"ppokernels bench wrote no $f; see logs/bench.log\"}" > "$OUT/$f"; fi
done
mv "$WORK/logs/machine.log" "$WORK/machine.txt" 2>/dev/null
tar czf "$OUT/logs.tar.gz" -C "$WORK" logs machine.txt \
  $(cd "$WORK" && ls -d junit.xml bench/*.png bench/raw bench/logs 2>/dev/null)
cd / && rm -rf "$WORK"
cat "$OUT/summary.txt"
