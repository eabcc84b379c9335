#!/usr/bin/env bash
# The GPU check, in stages that fit a short run on a borrowed H100/H200 without network access
# (Python 3.12, torch 2.11 + triton 3.6, ninja and compute-sanitizer preinstalled there):
#
#     bash scripts/gpu_check.sh 1      # stage 1, <= 3 min: build (sm_90, ninja), smoke tests, compute-sanitizer
#     bash scripts/gpu_check.sh 2      # stage 2, <= 4 min: benchmarks, their table and plot
#     bash scripts/gpu_check.sh        # stage 1 then stage 2 (8 min)
#     bash scripts/gpu_check.sh full   # the whole test suite on the GPU: its own command, not in the 8 min
#
# Stage 2 and `full` use stage 1's build when the machine still has it, else build first. Each
# step appends its output to a file under $OUT (default ./gpu_check_out) as it runs, and a
# PASS/FAIL/SKIP line with its wall time to status.txt when it ends, so a run cut short still
# returns what it did. At most 8 files:
#   status.txt  machine, versions, one line per step      stage1.log  smoke tests
#   build.log   the whole build log                        sanitizer.txt  memcheck, then racecheck
#   stage2.log  benchmarks: a line per case as it finishes, the summary table, the total time,
#               then the Markdown results (scripts/bench_report.py)
#   gpu.json    pytest-benchmark JSON    gpu.png  its plot    full.log  `full`
# To refresh the repository's RESULTS.md: copy gpu.json to results/gpu-run1.json and run the
# bench_report.py command at the top of RESULTS.md with it.
#
# Time. "Measured": on the project's 2-core CPU machine with torch 2.11.0 + triton 3.6.0, the GPU
# parts stubbed out (GPU_CHECK_STUB=1: pytest only starts and collects; compute-sanitizer is
# replaced by starting Python and importing what sanitizer_cases.py imports), while 3-4 other
# sessions loaded the machine (load average 8-15, wall times 5-10x the CPU seconds given).
# "Estimated": not run on a GPU yet; the first GPU run's status.txt replaces these figures.
#   stage 1, measured: machine step 3.5 s CPU; smoke pytest start + collection 7.5 s CPU;
#            a sanitizer pass's start 7 s CPU. Build (sm_90, 2 jobs; ninja's log, per file, wall):
#            csrc/cuda/bn_backward.cu 1078 s, bn_apply.cu 1030 s, cpu/bn_kernels_baseline.cpp 615 s,
#            bn_add_relu_cpu.cpp 458 s, bn_dual_apply_cpu.cpp 449 s, bn_kernels_x86_avx2.cpp 254 s
#            (bn_stats.cu and ops.cpp not timed: the load made them too slow to wait for). With
#            the whole build at 249 s on 2 unloaded cores (issue 10), the load inflated these ~10x.
#            estimated: build ~120 s on 16 cores (its slowest file, bn_backward.cu ~105 s, then
#            linking and pip);
#            smoke tests ~50 s (start 5 s; Triton JIT of at most ~110 kernel versions x ~0.17 s
#            = 19 s, scripts/count_triton_kernels.py counting 53 at the small shape and the
#            ResNet-50 shape adding at most as many; two torch.compile block forward+backward
#            ~10 s each; the checks ~5 s); sanitizer passes ~30 s each, beside the smoke tests.
#            Stage 1: 5 + 120 + 50 = 175 s, against 180 s: the build decides; MAX_JOBS and
#            TORCH_CUDA_ARCH_LIST can be set from outside.
#   stage 2, measured: machine step, pytest start + collection and bench_report 15 s CPU.
#            estimated: the benchmark session ~211 s (arithmetic in benchmarks/bench_common.py)
#            + 10 s: ~220 s, against 240 s; cut at 235 s, the JSON still holds what finished.
#   full,    estimated: ~877 Triton kernel versions (~2.5 min of JIT) plus the tests: 5-8 min.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
STUB=${GPU_CHECK_STUB:-0}
STATUS_FILE=$OUT/status.txt
mkdir -p "$OUT"
status=0

# step NAME LOG LIMIT_S COMMAND...: run COMMAND with its output appended to LOG, within LIMIT_S
# (SIGINT first, so pytest still writes its summary and JSON), then a status line.
step() {
  local name=$1 log=$2 limit=$3 start=$SECONDS rc verdict
  shift 3
  echo "=== $name ($(date -u +%H:%M:%S) UTC)" >> "$log"
  timeout --signal=INT --kill-after=20 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  case $rc in
    0) verdict=PASS ;;
    124) verdict="FAIL (cut at its ${limit} s limit)" ;;
    *) verdict="FAIL (exit $rc)" ;;
  esac
  printf '%-34s %-30s %4d s\n' "$name" "$verdict" $((SECONDS - start)) | tee -a "$STATUS_FILE"
  if [ "$rc" -ne 0 ]; then
    status=1
    tail -n 30 "$log"
  fi
  return "$rc"
}

note() { echo "$*" | tee -a "$STATUS_FILE"; }

PYTEST=(python -m pytest -p no:cacheprovider)
[ "$STUB" = 1 ] && PYTEST+=(--collect-only)  # stubbed: pytest starts and collects, runs nothing

machine() {
  note "=== $(date -u '+%Y-%m-%d %H:%M:%S') UTC, stage $1$([ "$STUB" = 1 ] && echo ', GPU parts stubbed')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$STATUS_FILE"
  python -c "import sys, torch, triton, numpy; print('python', sys.version.split()[0], 'torch', torch.__version__,
              'triton', triton.__version__, 'numpy', numpy.__version__, 'cuda', torch.version.cuda)" 2>&1 |
    tee -a "$STATUS_FILE"
  python -m ninja --version >/dev/null 2>&1 || command -v ninja >/dev/null ||
    note "no ninja: the build compiles one file at a time"
}

extension_on_gpu() {
  python -c "import sys, fused_residual as f; b = f.available_backends('cuda'); print('backends on cuda:', b);
sys.exit(0 if 'extension' in b else 1)" 2>/dev/null
}

build() {
  # sm_90 only (an H100/H200), all cores; the whole log is kept.
  local rc
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)} \
    step "build (sm_90, ninja)" "$OUT/build.log" "${GPU_CHECK_BUILD_LIMIT_S:-300}" \
    python -m pip install -v --no-build-isolation --no-deps -e .
  rc=$?
  if [ "$STUB" = 1 ]; then
    note "$(python -c "import fused_residual as f; print('backends on cpu:', f.available_backends('cpu'))" 2>&1)"
  else
    note "$(extension_on_gpu 2>&1 || true)"
  fi
  return $rc
}

sanitizer() {  # sanitizer TOOL: one case per kernel of every GPU backend (sanitizer_cases.py --quick)
  local tool=$1 bin
  if [ "$STUB" = 1 ]; then
      step "compute-sanitizer $tool (stub)" "$OUT/sanitizer.txt" 120 \
      python -c "import fused_residual, fused_residual.triton, scripts.sanitizer_cases"
    return
  fi
  bin=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)
  if [ -z "$bin" ]; then
    note "SKIP compute-sanitizer $tool: compute-sanitizer not found (PATH, /usr/local/cuda/bin)"
    return
  fi
  step "compute-sanitizer $tool" "$OUT/sanitizer.txt" 150 \
    "$bin" --tool "$tool" --error-exitcode 3 python scripts/sanitizer_cases.py --quick
}

sanitizers() {
  local rc=0
  sanitizer memcheck || rc=1
  sanitizer racecheck || rc=1
  return $rc
}

stage1() {
  machine 1
  build || return
  # The sanitizer passes run beside the smoke tests (16 cores; a pass mostly waits on
  # starting Python and CUDA under the tool).
  sanitizers &
  local sanitizing=$!
  step "smoke tests (pytest -m smoke)" "$OUT/stage1.log" 150 "${PYTEST[@]}" -q -m smoke tests/
  wait "$sanitizing" || status=1
  grep -hE "ERROR SUMMARY|RACECHECK SUMMARY|sanitizer cases done" "$OUT/sanitizer.txt" 2>/dev/null |
    tee -a "$STATUS_FILE"
}

stage2() {
  machine 2
  if [ "$STUB" != 1 ] && ! extension_on_gpu >/dev/null; then
    build || return
  fi
  # Tail first: the most important figures land first if the stage is cut short.
  step "benchmarks" "$OUT/stage2.log" 235 "${PYTEST[@]}" -q benchmarks/test_tail_bench.py \
    benchmarks/test_block_bench.py benchmarks/test_model_bench.py --benchmark-only \
    --benchmark-json="$OUT/gpu.json"
  grep -E "^benchmark session" "$OUT/stage2.log" | tail -n 1 | tee -a "$STATUS_FILE"
  local json=$OUT/gpu.json
  if [ "$STUB" = 1 ]; then  # a stand-in JSON for timing the report
    rm -f "$OUT/gpu.json"
    json=results/cpu-run1.json
  fi
  if [ -f "$json" ]; then
    step "report (bench_report.py)" "$OUT/stage2.log" 120 python scripts/bench_report.py "$json" \
      --plot-dir "$OUT"
    [ "$STUB" = 1 ] && rm -f "$OUT/cpu.png"
  fi
}

full() {
  machine full
  if [ "$STUB" != 1 ] && ! extension_on_gpu >/dev/null; then
    build || return
  fi
  step "full test suite" "$OUT/full.log" 590 "${PYTEST[@]}" -q tests/
}

START=$SECONDS
case "${1:-all}" in
  1) stage1 ;;
  2) stage2 ;;
  full) full ;;
  all) stage1; stage2 ;;
  *) echo "usage: bash scripts/gpu_check.sh [1|2|full]" >&2; exit 2 ;;
esac
note "=== stage ${1:-all}: $((SECONDS - START)) s wall, exit status $status (files in $OUT)"
exit $status
