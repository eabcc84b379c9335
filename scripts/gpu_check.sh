#!/usr/bin/env bash
# The first GPU run (issue 19): one command on a borrowed H100/H200 (no network; Python 3.12,
# torch 2.11 + triton 3.6, ninja and compute-sanitizer there) that always leaves results.
#
#     bash scripts/gpu_check.sh            # the whole check, within one deadline (550 s)
#     bash scripts/gpu_check.sh --plan     # print the steps, their limits and the planned times
#     bash scripts/gpu_check.sh full       # build, then the whole test suite (a command of its own)
#
# Order: preflight (GPU, driver and tool versions, <= 15 s); the Triton smoke tests, while the
# extension builds in the background (once per run; a failed or timed-out build is recorded
# with its last lines and only the steps that need it are skipped); available_backends("cuda")
# and one CUDA op call; compute-sanitizer memcheck, racecheck and initcheck (caching allocator
# off); fp32 reference comparisons of both backends (worst error as a fraction of its bound);
# CUDA-graph capture; torch.compile(fullgraph=True) of a Triton-backend training step;
# benchmarks with the time left. Every step's limit comes from the time left (scripts/gpu_plan.py).
#
# Results, as they come, in $OUT (default ./gpu_check_out; 8 files, what a device call returns):
#   status.txt  one line per step: PASS/FAIL/SKIPPED, its time, the run's time, key figures
#   build.log   the build        tests.log   pytest (Triton smoke tests, or `full`)
#   sanitizer.txt  the three tools   checks.log  preflight and scripts/gpu_checks.py
#   bench.log   the benchmarks' pytest   bench_cases.jsonl  each benchmark case as it finishes
#   gpu.json    pytest-benchmark's JSON (written when pytest exits, before the deadline)
# To refresh RESULTS.md: copy gpu.json to results/gpu-run1.json and run the bench_report.py
# command at the top of RESULTS.md with it (here, not on the GPU machine).
#
# Settings: PYTHON (python3), OUT, GPU_CHECK_DEADLINE_S (550), TORCH_CUDA_ARCH_LIST (9.0),
# MAX_JOBS (all cores). GPU_CHECK_STUB=1 runs the control flow without a GPU (stubbed steps;
# tests/test_gpu_check.py), GPU_CHECK_TIME_SCALE scales every time.
set -uo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" scripts/gpu_run.py "$@"
