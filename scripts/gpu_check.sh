#!/usr/bin/env bash
# One-command GPU check for an H100/H200 machine without network access (torch 2.11 +
# triton 3.6 on Python 3.12 there): build, full test suite on the GPU, compute-sanitizer
# memcheck (and racecheck for the CUDA kernels) on a small case of every kernel, the GPU
# benchmarks (the whole-ResNet-50 step included: two torch.compile warmups), and their
# Markdown table and PNG plot. Everything lands in $OUT
# (default ./gpu_check_out), at most 8 files; the summary table prints last.
#
#     bash scripts/gpu_check.sh            # not yet timed on a GPU (target: 8 minutes on an H100)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
status=0
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/machine.txt"
python -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/machine.txt"

step "build"
MAX_JOBS=${MAX_JOBS:-16} pip install -e . --no-build-isolation --no-deps -q 2>&1 | tail -n 20 || status=1
python -c "import fused_residual as f; print('backends on cuda:', f.available_backends('cuda'))" | tee -a "$OUT/machine.txt"

step "tests on the GPU"
python -m pytest -q -p no:cacheprovider -x tests/ 2>&1 | tee "$OUT/tests.txt" | tail -n 25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "compute-sanitizer"
compute-sanitizer --tool memcheck --error-exitcode 3 python scripts/sanitizer_cases.py \
  > "$OUT/sanitizer.txt" 2>&1 || status=1
if python -c "import fused_residual as f, sys; sys.exit('extension' not in f.available_backends('cuda'))"; then
  compute-sanitizer --tool racecheck --error-exitcode 3 python scripts/sanitizer_cases.py --backends extension \
    >> "$OUT/sanitizer.txt" 2>&1 || status=1
fi
grep -E "ERROR SUMMARY|RACECHECK SUMMARY|sanitizer cases done|Error" "$OUT/sanitizer.txt" | head -n 40

step "benchmarks"
python -m pytest -q -p no:cacheprovider benchmarks/ --benchmark-only --benchmark-json="$OUT/gpu.json" \
  --benchmark-columns=median,iqr,rounds 2>&1 | tail -n 5 > "$OUT/bench_tail.txt" || status=1
# RESULTS.md (GPU section) and gpu.png, from the JSON alone. Copy gpu.json to results/ and
# rerun scripts/bench_report.py there with the CPU JSON to refresh the repository's RESULTS.md.
python scripts/bench_report.py "$OUT/gpu.json" --results "$OUT/RESULTS.md" --plot-dir "$OUT" >/dev/null || status=1

step "summary (exit status $status)"
cat "$OUT/machine.txt"
cat "$OUT/RESULTS.md" 2>/dev/null
exit $status
