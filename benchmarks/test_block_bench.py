"""The seed ResidualBlock against FusedResidualBlock: training step and eval forward."""

from __future__ import annotations

import pytest
import torch
from bench_common import DEVICE, record, time_case

import fused_residual
from fused_residual.bench_utils import synchronize
from fused_residual.seed import ResidualBlock

if DEVICE == "cuda":
    # ResNet stage shapes, bf16 channels_last: (N, C_in, C_out, H, W).
    BLOCKS = [(128, 64, 64, 56, 56), (128, 256, 256, 14, 14)]
    DTYPE = torch.bfloat16
else:
    # The seed's shapes, small enough for a 2-core CPU.
    BLOCKS = [(8, 64, 64, 28, 28), (8, 32, 64, 28, 28)]
    DTYPE = torch.float32

FUSED = [b for b in fused_residual.available_backends(DEVICE) if b != "reference"
         and not (b == "triton" and DEVICE == "cpu")]


def block_id(block) -> str:
    n, cin, cout, h, w = block
    return f"block {n}x{cin}->{cout}x{h}x{w} {str(DTYPE).removeprefix('torch.')} channels_last"


@pytest.mark.parametrize("provider", ["eager", *FUSED])
@pytest.mark.parametrize("mode", ["train_step", "eval_fwd"])
@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: "{}x{}-{}x{}x{}".format(*b))
def test_block(benchmark, block, mode, provider):
    n, cin, cout, h, w = block
    torch.manual_seed(0)
    seed = ResidualBlock(cin, cout)
    if provider == "eager":
        module = seed
    else:
        module = fused_residual.FusedResidualBlock(cin, cout, backend=provider)
        module.load_state_dict(seed.state_dict())
    module = module.to(device=DEVICE, dtype=DTYPE, memory_format=torch.channels_last)
    x = torch.randn(n, cin, h, w, device=DEVICE, dtype=DTYPE).contiguous(memory_format=torch.channels_last)
    module.train(mode == "train_step")

    def timed():
        if mode == "train_step":
            out = module(x)
            out.backward(torch.ones_like(out))
        else:
            with torch.no_grad():
                module(x)
        synchronize(DEVICE)

    benchmark.group = f"{block_id(block)} {mode}"
    extra = time_case(benchmark, timed)
    record(f"{block_id(block)} {mode}", provider, benchmark, extra)
