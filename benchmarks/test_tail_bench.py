"""The fused tail against eager PyTorch and torch.compile: eval forward and training
forward+backward per ResNet-50 tail shape (GPU, the ten cases of stage 2 of
scripts/gpu_check.sh), plus the training forward alone on a CPU-sized set.

Run: `pytest benchmarks/ --benchmark-only` (add `--benchmark-json=out.json` for the report
script). `--benchmark-disable` runs each case once as a test. The torch.compile provider is a
fresh compiled function per case (bench_common.compile_baseline), checked to run compiled code.
"""

from __future__ import annotations

import pytest
import torch
from bench_common import DEVICE, compile_baseline, record, time_case

import fused_residual
from fused_residual.bench_utils import MODES, ideal_bytes, make_tail_problem, synchronize, tail_callable
from fused_residual.reference import bn_add_relu_reference

# The five ResNet-50 tail shapes (C, H, W).
RESNET50_TAILS = [(64, 56, 56), (256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)]

if DEVICE == "cuda":
    # (shape, dtype, channels_last, residual): bf16 channels_last and fp32 NCHW at N=128.
    CASES = [((128, *chw), torch.bfloat16, True, True) for chw in RESNET50_TAILS]
    CASES += [((128, *chw), torch.float32, False, True) for chw in RESNET50_TAILS]
    BENCH_MODES = ["eval_fwd", "train_fwdbwd"]
else:
    # CPU, float32, N=32: the (32, 64, 56, 56) in both layouts, a late-stage shape, and
    # BatchNorm+ReLU without a residual.
    CASES = [((32, 64, 56, 56), torch.float32, False, True), ((32, 64, 56, 56), torch.float32, True, True),
             ((32, 1024, 14, 14), torch.float32, True, True), ((32, 64, 56, 56), torch.float32, False, False)]
    BENCH_MODES = list(MODES)

FUSED = [b for b in fused_residual.available_backends(DEVICE) if b != "reference"
         and not (b == "triton" and DEVICE == "cpu")]  # the interpreter is a test vehicle only
PROVIDERS = ["eager", "compile", *FUSED]


def case_id(case) -> str:
    shape, dtype, channels_last, residual = case
    layout = "channels_last" if channels_last else "NCHW"
    tail = "bn_add_relu" if residual else "bn_relu"
    return f"{tail} {'x'.join(map(str, shape))} {str(dtype).removeprefix('torch.')} {layout}"


def param_id(case) -> str:
    """A short test id (the pytest-benchmark table's name column); case_id names the group."""
    shape, dtype, channels_last, residual = case
    dtype_name = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}[dtype]
    layout = "cl" if channels_last else "nchw"
    return f"{'x'.join(map(str, shape))}-{dtype_name}-{layout}{'' if residual else '-noadd'}"


def _eager(x, r, rm, rv, w, b, training):
    return bn_add_relu_reference(x, r, rm, rv, w, b, training)


def forward_for(provider: str):
    """The tail function `provider` times; "compile" is compiled afresh for each case."""
    if provider == "eager":
        return _eager
    if provider == "compile":
        return compile_baseline(_eager)

    def fused(x, r, rm, rv, w, b, training):
        return fused_residual.bn_add_relu(x, r, rm, rv, w, b, training, backend=provider)

    return fused


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", BENCH_MODES)
@pytest.mark.parametrize("case", CASES, ids=param_id)
def test_tail(benchmark, copy_gbps, case, mode, provider):
    shape, dtype, channels_last, residual = case
    problem = make_tail_problem(shape, dtype, channels_last, DEVICE, residual=residual)
    run = tail_callable(problem, mode, forward_for(provider))

    def timed():
        run()
        synchronize(DEVICE)

    benchmark.group = f"{case_id(case)} {mode}"
    extra = time_case(benchmark, timed, compiled=provider == "compile")
    nbytes = ideal_bytes(mode, problem.numel, problem.itemsize, residual)
    ms = benchmark.stats.stats.median * 1e3 if benchmark.stats is not None else None
    extra.update(ideal_bytes=nbytes, copy_GBps=round(copy_gbps, 1))
    if ms:
        extra["GBps"] = round(nbytes / ms / 1e6, 1)
        extra["pct_of_copy"] = round(100 * extra["GBps"] / copy_gbps, 1)
    record(f"{case_id(case)} {mode}", provider, benchmark, extra)
