"""Two-process gloo DistributedDataParallel run of a converted resnet18 (used by
tests/test_convert.py::test_distributed_data_parallel_gloo; prints "ddp ok" on success).

Each rank trains a converted float64 resnet18 under DDP on its half of the batch for two SGD
steps. Without SyncBatchNorm, BatchNorm statistics are per rank, so the reference is not one
model on the whole batch: it is the original (unconverted) model run on each rank's half
separately, in this process, with the two parameter gradients averaged by hand, which is
what DDP's all-reduce computes. Checked on every rank, every step: the DDP gradients equal
the hand average (float64: the converted and original models differ by summation order
only, far below the 1e-9 tolerance), and are bitwise equal across ranks; after the steps,
the parameters equal the reference's, and rank 0's running statistics (DDP broadcasts rank
0's buffers) equal those of the reference run on rank 0's half.
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(__file__))
from test_convert import randomize

import fused_residual

WORLD, STEPS, LR = 2, 2, 0.05
TOL = dict(rtol=1e-9, atol=1e-11)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    # 64x64: layer4 sees 2x2 maps, 8 values per channel on a rank (at 32x32 it would be 2,
    # where BatchNorm's backward amplifies float64 rounding ~1e7-fold).
    x = torch.randn(2 * WORLD, 3, 64, 64, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (2 * WORLD,), generator=g)
    return x, y


def grads_of(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def run(rank: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    original = randomize(torchvision.models.resnet18(num_classes=10)).double().train()
    refs = [copy.deepcopy(original) for _ in range(WORLD)]  # the original model on each half
    model = DDP(fused_residual.convert(copy.deepcopy(original), backend="extension"))
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(STEPS):
        x, y = batch(step)
        halves = list(zip(x.chunk(WORLD), y.chunk(WORLD), strict=True))
        ddp_grads = grads_of(model, *halves[rank])
        per_rank = [grads_of(ref, *half) for ref, half in zip(refs, halves, strict=True)]
        average = [sum(gs) / WORLD for gs in zip(*per_rank, strict=True)]
        for (name, _), got, want in zip(model.module.named_parameters(), ddp_grads, average, strict=True):
            where = f"rank {rank} step {step} {name}"
            torch.testing.assert_close(got, want, **TOL, msg=lambda m, where=where: f"{where}: {m}")
        flat = torch.cat([g.flatten() for g in ddp_grads])
        gathered = [torch.empty_like(flat) for _ in range(WORLD)]
        dist.all_gather(gathered, flat)
        assert all(torch.equal(gathered[0], g) for g in gathered), "ranks hold different gradients"
        opt.step()
        with torch.no_grad():
            for ref in refs:
                for p, g in zip(ref.parameters(), average, strict=True):
                    p -= LR * g
    for (name, p), q in zip(model.module.named_parameters(), refs[0].parameters(), strict=True):
        torch.testing.assert_close(p, q, **TOL, msg=f"rank {rank} parameter {name}")
    if rank == 0:
        for (name, b), c in zip(model.module.named_buffers(), refs[0].buffers(), strict=True):
            torch.testing.assert_close(b, c, **TOL, msg=f"rank 0 buffer {name}")
    dist.destroy_process_group()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(run, args=(os.path.join(tmp, "init"),), nprocs=WORLD, join=True)
    print("ddp ok")


if __name__ == "__main__":
    main()
