"""Checks of models made by fused_residual.convert and then synchronized, that
tests/sync_worker.py runs in every rank of the 2-rank job (registered in sync_checks.CHECKS;
nothing is registered without torchvision).

Every check trains in float64 on each rank's rows and compares with the original (unconverted,
unsynchronized) model trained in one process on the whole batch, which synchronized BatchNorm
must reproduce: equal per-rank batch sizes, parameter gradients averaged (DDP) or summed over
ranks, so the exact check is float64 with a tight tolerance.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from sync_cases import CollectiveCounter, agreed, rows_of
from sync_checks import Ctx, check
from torch.nn.parallel import DistributedDataParallel as DDP

import fused_residual
from fused_residual.distributed.reference import sync_batch_norm_reference

try:
    import torchvision
    from model_checks import randomize_norms
except ImportError:  # no torchvision: these checks are not registered
    torchvision = None
converted_sync_block = None  # without torchvision

TOL = dict(rtol=1e-9, atol=1e-11)
SIZES = [2, 2]  # rows per rank
LR = 0.05


def batch(step: int, shape: tuple[int, ...], ctx: Ctx) -> torch.Tensor:
    """The whole batch of a step, identical on every rank."""
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(sum(SIZES), *shape, generator=g, dtype=torch.float64).to(ctx.device)


def loss_weights(step: int, out: torch.Tensor) -> torch.Tensor:
    """The loss is sum(out * weights): of the whole batch's output in one process, of this
    rank's rows of it on a rank (the ranks' losses add up to the whole batch's)."""
    g = torch.Generator().manual_seed(200 + step)
    return torch.randn(out.shape, generator=g, dtype=out.dtype).to(out.device)


def train(ctx: Ctx, model: nn.Module, original: nn.Module, shape: tuple[int, ...], *, steps: int = 2,
          forward_gathers: int, ddp: DDP | None = None) -> None:
    """`steps` SGD steps of `model` (through its DDP wrapper, if given) on this rank's rows
    and of `original` on the whole batch, then the parameters and buffers compared. The first
    forward must make `forward_gathers` all_gathers (one per synchronized fused part)."""
    rows = rows_of(SIZES, ctx.rank)
    for step in range(steps):
        x = batch(step, shape, ctx)
        model.zero_grad(set_to_none=True)
        original.zero_grad(set_to_none=True)
        with CollectiveCounter() as counter:
            out = (ddp or model)(x[rows])
        with agreed(ctx.device):
            gathers = counter.calls.count("all_gather_into_tensor")
            assert step > 0 or gathers == forward_gathers, f"{gathers} all_gathers: {counter.calls}"
        whole = original(x)
        weights = loss_weights(step, whole)
        (whole * weights).sum().backward()
        (out * weights[rows]).sum().backward()
        torch.testing.assert_close(out, whole[rows].detach(), **TOL, msg=lambda m: f"output: {m}")
        with torch.no_grad():
            for p in model.parameters():
                if ddp is None:
                    dist.all_reduce(p.grad)  # the sum over ranks: the whole batch's gradient
                else:
                    p.grad *= len(SIZES)  # DDP averages over ranks
                p -= LR * p.grad
            for p in original.parameters():
                p -= LR * p.grad
    for (name, p), q in zip(model.named_parameters(), original.parameters(), strict=True):
        torch.testing.assert_close(p, q, **TOL, msg=lambda m, name=name: f"parameter {name}: {m}")
    for (name, b), c in zip(model.named_buffers(), original.buffers(), strict=True):
        torch.testing.assert_close(b, c, **TOL, msg=lambda m, name=name: f"buffer {name}: {m}")


def downsampling_block(inplanes: int, planes: int) -> nn.Module:
    """torchvision's BasicBlock with a strided Sequential(conv, BatchNorm2d) shortcut."""
    down = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=2, bias=False), nn.BatchNorm2d(planes))
    return randomize_norms(torchvision.models.resnet.BasicBlock(inplanes, planes, stride=2, downsample=down))


def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return randomize_norms(torchvision.models.resnet18(num_classes=10)).double().train()


if torchvision is not None:
    @check(2)
    def ddp_converted_resnet18(ctx: Ctx):
        """A converted resnet18 synchronized by fused_residual.convert_sync_batchnorm, under
        DistributedDataParallel: two steps on each rank's half of the batch give the original's
        parameters and buffers after two steps on the whole batch; each of the 17 fused parts
        synchronizes (one all_gather each)."""
        original = resnet18().to(ctx.device)
        model = fused_residual.convert(copy.deepcopy(original), backend=ctx.backend)
        if ctx.device.type == "cpu":
            # DDP refuses a CPU module that holds an nn.SyncBatchNorm (PyTorch's is GPU-only):
            # convert_sync_batchnorm swaps classes in place, so it synchronizes after wrapping.
            ddp = DDP(model)
            fused_residual.convert_sync_batchnorm(ddp)
        else:
            ddp = DDP(fused_residual.convert_sync_batchnorm(model), device_ids=[ctx.device.index])
        assert type(model.layer2[0].bn2) is fused_residual.SyncBatchNormAddReLU2d
        train(ctx, model, original, (3, 64, 64), forward_gathers=17, ddp=ddp)

    @check(2)
    def both_conversion_orders(ctx: Ctx):
        """nn.SyncBatchNorm.convert_sync_batchnorm before convert (a resnet18 with one block
        per stage: all 9 parts fused and synchronized), and after it (resnet18's layer2: the
        new, plain nn.SyncBatchNorm modules run fused and synchronized in the blocks convert()
        fused, the dual tail included; on CPU nn.SyncBatchNorm itself would refuse)."""
        torch.manual_seed(0)
        small = randomize_norms(torchvision.models.resnet.ResNet(
            torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=10)).double().train()
        small = small.to(ctx.device)
        before = fused_residual.convert(nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(small)),
                                        backend=ctx.backend)
        train(ctx, before, small, (3, 64, 64), forward_gathers=9)
        original = resnet18().to(ctx.device).layer2
        after = fused_residual.convert(resnet18().to(ctx.device), backend=ctx.backend).layer2
        nn.SyncBatchNorm.convert_sync_batchnorm(after)
        assert type(after[0].bn1) is type(after[0].downsample[1]) is nn.SyncBatchNorm
        train(ctx, after, original, (64, 8, 8), forward_gathers=4)

    @check(2)
    def dual_tail_one_synchronized(ctx: Ctx):
        """A converted, synchronized downsampling block whose shortcut norm is then made a plain
        BatchNorm2d again: the shortcut runs as modules (local statistics) and feeds the
        synchronized single fused tail; output, gradients and running statistics as PyTorch's
        SyncBatchNorm algorithm (distributed.reference) for bn1/bn2 with a local shortcut."""
        torch.manual_seed(0)
        original = downsampling_block(3, 4).double().to(ctx.device)
        block = fused_residual.convert_sync_batchnorm(
            fused_residual.convert(copy.deepcopy(original), backend=ctx.backend))
        block.downsample[1].__class__ = nn.BatchNorm2d

        def reference(x: torch.Tensor) -> torch.Tensor:
            def synced(bn: nn.Module, t: torch.Tensor) -> torch.Tensor:
                return sync_batch_norm_reference(t, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                                 True, bn.momentum, bn.eps, dist.group.WORLD, ctx.world)
            out = F.relu(synced(original.bn1, original.conv1(x)))
            return F.relu(synced(original.bn2, original.conv2(out)) + original.downsample(x))

        x = batch(0, (3, 6, 6), ctx)[rows_of(SIZES, ctx.rank)]
        with CollectiveCounter() as counter:
            out = block(x)
        want = reference(x)
        weights = loss_weights(0, out)
        (out * weights).sum().backward()
        (want * weights).sum().backward()
        with agreed(ctx.device):
            assert counter.calls == ["all_gather_into_tensor"] * 2, counter.calls
            torch.testing.assert_close(out, want, **TOL)
            for (name, p), q in zip(block.named_parameters(), original.parameters(), strict=True):
                torch.testing.assert_close(p.grad, q.grad, **TOL, msg=lambda m, n=name: f"grad {n}: {m}")
            for (name, b), c in zip(block.named_buffers(), original.buffers(), strict=True):
                if "num_batches_tracked" not in name:  # (the reference does not count batches)
                    torch.testing.assert_close(b, c, **TOL, msg=lambda m, name=name: f"{name}: {m}")

    def converted_sync_block(backend: str) -> nn.Module:
        """For compile_training_step (sync_module_checks.py): a downsampling block (3 -> 4
        channels), converted and synchronized: a fused bn1 + ReLU and a synchronized dual tail."""
        torch.manual_seed(0)
        block = fused_residual.convert(downsampling_block(3, 4), backend=backend)
        return fused_residual.convert_sync_batchnorm(block)
