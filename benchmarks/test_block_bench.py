"""The seed ResidualBlock against FusedResidualBlock: training step and eval forward, over a
sweep of batch sizes, widths, ResNet-50 stage spatial sizes, both layouts and both dtypes
(issue 21: the fused block is never slower than the block it replaces), plus torch.compile
of each on one case (compile + fused >= compile).

CPU sweep, sized for one `pytest benchmarks/ --benchmark-only` session of about 10 minutes
on 2 cores: every (N, C, H) below in float32 and bfloat16, channels_last and NCHW, train step
and eval forward, eager vs extension, 80 cases; C -> C blocks (identity shortcut) whose 3x3
convs cost about the same per image across the ResNet-50 stages (C * H is constant along
them), with batch 1, 8 and 32 and widths from 64 to 1024:

    (1, 64, 56)    batch 1, stage 1 (conv1 64 -> 64 at 56x56)
    (8, 64, 28)    the seed's case (the issue's eval regression)
    (32, 128, 14)  batch 32 at a late-stage spatial size
    (8, 256, 14)   stage 3
    (1, 1024, 7)   the widest, batch 1: the tail is a small part of the step

plus the seed's projection case 8x32->64x28x28 (1x1 conv shortcut), float32 channels_last.
Rounds: the session's per-case budget (bench_common.CASE_BUDGET_S), at least MIN_ROUNDS.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from bench_common import DEVICE, compile_baseline, record, time_case

import fused_residual
from fused_residual.bench_utils import dtype_name, synchronize
from fused_residual.seed import ResidualBlock

if DEVICE == "cuda":
    # ResNet stage shapes, bf16 channels_last: (N, C_in, C_out, H, W).
    SWEEP = [(128, 64, 64, 56, 56), (128, 256, 256, 14, 14)]
    VARIANTS = [(torch.bfloat16, True)]
    EXTRA: list = []
    COMPILED = [((128, 64, 64, 56, 56), torch.bfloat16, True)]
else:
    SWEEP = [(n, c, c, h, h) for n, c, h in
             [(1, 64, 56), (8, 64, 28), (32, 128, 14), (8, 256, 14), (1, 1024, 7)]]
    VARIANTS = [(torch.float32, True), (torch.float32, False),
                (torch.bfloat16, True), (torch.bfloat16, False)]
    EXTRA = [((8, 32, 64, 28, 28), torch.float32, True)]
    COMPILED = [((8, 64, 64, 28, 28), torch.float32, True)]

CASES = [(block, dtype, cl) for block, (dtype, cl) in itertools.product(SWEEP, VARIANTS)] + EXTRA
FUSED = [b for b in fused_residual.available_backends(DEVICE) if b != "reference"
         and not (b == "triton" and DEVICE == "cpu")]


def block_id(case) -> str:
    (n, cin, cout, h, w), dtype, channels_last = case
    layout = "channels_last" if channels_last else "NCHW"
    return f"block {n}x{cin}->{cout}x{h}x{w} {dtype_name(dtype)} {layout}"


def param_id(case) -> str:
    (n, cin, cout, h, _), dtype, channels_last = case
    dtype_id = "bf16" if dtype == torch.bfloat16 else "f32"
    return f"{n}x{cin}-{cout}x{h}-{dtype_id}-{'cl' if channels_last else 'nchw'}"


def make_blocks(case, provider: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """The seed block (eager, compile) or its fused twin with the same weights, and an input."""
    (n, cin, cout, h, w), dtype, channels_last = case
    torch.manual_seed(0)
    seed = ResidualBlock(cin, cout)
    if provider in ("eager", "compile"):
        module = seed
    else:
        backend = provider.removeprefix("compile+")
        module = fused_residual.FusedResidualBlock(cin, cout, backend=backend)
        module.load_state_dict(seed.state_dict())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    module = module.to(device=DEVICE, dtype=dtype, memory_format=fmt)
    x = torch.randn(n, cin, h, w, device=DEVICE, dtype=dtype).contiguous(memory_format=fmt)
    return module, x


def run_block(benchmark, case, mode: str, provider: str) -> None:
    module, x = make_blocks(case, provider)
    module.train(mode == "train_step")
    compiled = provider.startswith("compile")
    net = compile_baseline(module) if compiled else module

    def timed():
        if mode == "train_step":
            out = net(x)
            out.backward(torch.ones_like(out))
        else:
            with torch.no_grad():
                net(x)
        synchronize(DEVICE)

    group = f"{block_id(case)} {mode}"
    benchmark.group = group
    extra = time_case(benchmark, timed, compiled=compiled)
    record(group, provider, benchmark, extra)


@pytest.mark.parametrize("provider", ["eager", *FUSED])
@pytest.mark.parametrize("mode", ["train_step", "eval_fwd"])
@pytest.mark.parametrize("case", CASES, ids=param_id)
def test_block(benchmark, case, mode, provider):
    run_block(benchmark, case, mode, provider)


@pytest.mark.parametrize("provider", ["compile", *(f"compile+{b}" for b in FUSED)])
@pytest.mark.parametrize("mode", ["train_step", "eval_fwd"])
@pytest.mark.parametrize("case", COMPILED, ids=param_id)
def test_block_compiled(benchmark, case, mode, provider):
    """torch.compile of the seed block and of the fused block (issue 21: compile + fused must
    be at least as fast as compile): recorded in the same group as the eager rows."""
    run_block(benchmark, case, mode, provider)
