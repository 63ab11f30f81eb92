#!/usr/bin/env bash
# GPU check: on a machine with a CUDA GPU, torch, triton and nvcc preinstalled and no network,
# build the CUDA extension, run the test suite on CUDA and the GPU benchmarks (llm preset), and
# write everything to OUT_DIR. Budget: under 8 minutes on an H100/H200 with 16 cores.
#
#   benchmarks/gpu_check.sh OUT_DIR
#
# OUT_DIR/summary.txt lists each step's exit status and seconds; logs and results lie beside it
# (build.log, tests.log, junit.xml, bench/results.json, bench/report.md, bench/*.png).
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
: > "$OUT/summary.txt"

step() {  # step NAME TIMEOUT_S CMD...: runs CMD with a time limit, logs to OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout --signal=INT --kill-after=20 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc seconds=$((SECONDS - t0))" | tee -a "$OUT/summary.txt"
  return $rc
}

{
  nvidia-smi || true
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, 'gpu', torch.cuda.get_device_name(0))"
  nvcc --version | tail -2
  echo "cpu cores: $(nproc)"
} > "$OUT/machine.txt" 2>&1

step build 300 env PPOKERNELS_BUILD_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}" \
  python -m pip install --no-build-isolation --no-deps --no-index -e . || true
step info 60 ppokernels info --json || true
# CUDA-parametrised tests and the CUDA-only tests (their ids contain "cuda")
step tests 150 python -m pytest tests -q -p no:cacheprovider -k "cuda" \
  --junitxml="$OUT/junit.xml" || true
step bench 200 ppokernels bench --preset llm --out "$OUT/bench" || true
cat "$OUT/summary.txt"
