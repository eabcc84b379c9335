"""The checks tests/sync_worker.py runs in every rank of a spawned process group: the
synchronized functionals on each rank's rows against a float64 truth on the whole batch
under the derived bound (sync_cases.py), for each world size they are registered for. More checks (modules,
torch.compile, process groups) are in sync_module_checks.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from sync_cases import agreed, compare_with_whole_batch, dual_fn, problem, run, single_fn, whole_batch

import fused_residual

FUSED_CALLS = (["all_gather_into_tensor"], ["all_reduce"])  # one per forward, one per backward


@dataclass
class Ctx:
    rank: int
    world: int
    device: torch.device
    backend: str  # the fused backend of this job ("extension" on CPU)


# name -> (check, the world sizes whose job runs it, the device types it runs on)
CHECKS: dict[str, tuple[Callable[[Ctx], None], tuple[int, ...], tuple[str, ...]]] = {}


def check(*worlds: int, devices: tuple[str, ...] = ("cpu", "cuda")):
    """Register a check for the jobs of these world sizes (none: only run when named)."""
    def register(fn):
        CHECKS[fn.__name__] = (fn, worlds, devices)
        return fn
    return register


def checks_for(world: int, device_type: str) -> list[str]:
    return [name for name, (_, worlds, devices) in CHECKS.items()
            if world in worlds and device_type in devices]


def sync_single(ctx: Ctx, name: str, sizes: list[int], dtype=torch.float32, *, backend: str | None = None,
                momentum: float = 0.1, group=None, calls=FUSED_CALLS, chw=(3, 4, 5), **case) -> None:
    """The synchronized single-BatchNorm tail on each rank's rows vs the whole batch."""
    backend = backend or ctx.backend
    prob = problem(sizes, chw, dtype, ctx.device, **case)
    leaves, stats, grad = prob.slice(ctx.rank)
    got = run(single_fn(fused_residual.sync_bn_add_relu, momentum=momentum, process_group=group,
                        backend=backend), leaves, stats, grad)
    whole = whole_batch(prob, False, momentum=momentum)
    with agreed(ctx.device, group):
        if leaves["input"].is_contiguous(memory_format=torch.channels_last) and sizes[ctx.rank] > 1:
            assert got.out.is_contiguous(memory_format=torch.channels_last), f"{name}: output layout"
        assert (got.forward_calls, got.backward_calls) == calls, (got.forward_calls, got.backward_calls)
    compare_with_whole_batch(name, got, whole, sizes, ctx.rank, group)


def sync_dual(ctx: Ctx, name: str, sizes: list[int], dtype=torch.float32, *, backend: str | None = None,
              group=None, calls=FUSED_CALLS, options: dict | None = None, **case) -> None:
    """The synchronized two-BatchNorm tail on each rank's rows vs the whole batch."""
    backend = backend or ctx.backend
    options = options or {}
    prob = problem(sizes, (3, 4, 5), dtype, ctx.device, dual=True, **case)
    leaves, stats, grad = prob.slice(ctx.rank)
    got = run(dual_fn(fused_residual.sync_dual_bn_add_relu, process_group=group, backend=backend,
                      **options), leaves, stats, grad)
    whole = whole_batch(prob, True, **options)
    with agreed(ctx.device, group):
        assert (got.forward_calls, got.backward_calls) == calls, (got.forward_calls, got.backward_calls)
    compare_with_whole_batch(name, got, whole, sizes, ctx.rank, group)


@check(2)
def fp32_nchw_equal_batches(ctx):
    sync_single(ctx, "fp32 NCHW", [2, 2])


@check(2)
def fp32_channels_last_unequal_batches(ctx):
    sync_single(ctx, "fp32 channels_last", [3, 1], layout="channels_last")


@check(2)
def fp64_exact(ctx):
    sync_single(ctx, "fp64", [3, 2], torch.float64)
    sync_dual(ctx, "fp64 dual", [1, 3], torch.float64, layout="channels_last")


@check(2)
def bf16_channels_last(ctx):
    sync_single(ctx, "bf16 channels_last", [2, 3], torch.bfloat16, layout="channels_last")


@check(2)
def one_value_per_channel_on_a_rank(ctx):
    # F.batch_norm refuses one value per channel; a synchronized rank may hold one (the
    # statistics span every rank), as nn.SyncBatchNorm allows.
    sync_single(ctx, "one value per channel", [1, 3], chw=(3, 1, 1))


@check(2)
def no_residual(ctx):
    sync_single(ctx, "no residual", [2, 2], residual=False)


@check(2)
def affine_false_and_no_running_stats(ctx):
    sync_single(ctx, "affine=False", [3, 1], affine=False)
    sync_single(ctx, "no running stats", [1, 2], running_stats=False, momentum=0.3)


@check(2, 3)
def empty_rank(ctx):
    sizes = [3, 0] if ctx.world == 2 else [2, 0, 3]
    sync_single(ctx, "empty rank", sizes)
    sync_single(ctx, "empty rank channels_last", sizes, layout="channels_last", residual=False)
    sync_dual(ctx, "empty rank dual", sizes)


@check(2, 3)
def dual(ctx):
    sizes = [2, 3] if ctx.world == 2 else [1, 2, 1]
    sync_dual(ctx, "dual", sizes)
    sync_dual(ctx, "dual channels_last + NCHW", sizes, layout="channels_last")
    sync_dual(ctx, "dual bf16", sizes, torch.bfloat16, layout="channels_last", layout2="channels_last")


@check(2)
def dual_second_in_eval_and_options(ctx):
    # Only the first BatchNorm trains: its statistics are gathered, the second's are its
    # running statistics (no collective of its own).
    sync_dual(ctx, "dual, second eval", [2, 1], options=dict(training2=False, eps2=1e-2))
    sync_dual(ctx, "dual, own momenta/eps", [1, 2], options=dict(momentum=0.3, eps=1e-3, momentum2=0.05))


@check(2)
def dual_without_dual_kernel(ctx):
    """Where the backend has no bn_dual_apply kernel for the device, the synchronized dual
    tail runs that one step as its eager reference: the same values under the rule."""
    from fused_residual.distributed import autograd as sync_autograd

    served, reference = sync_autograd.dual_apply_served, sync_autograd.bn_dual_apply_reference
    calls = []
    sync_autograd.dual_apply_served = lambda name, device_type: False
    sync_autograd.bn_dual_apply_reference = lambda *args: calls.append(1) or reference(*args)
    try:
        sync_dual(ctx, "dual without a bn_dual_apply kernel", [2, 1])
    finally:
        sync_autograd.dual_apply_served, sync_autograd.bn_dual_apply_reference = served, reference
    assert calls == [1], calls


@check(2)
def reference_backend(ctx):
    """backend="reference": PyTorch's SyncBatchNorm algorithm (eager, one all_gather and one
    all_reduce per BatchNorm) + add + ReLU. Checked in float64, where the rule is exact up to
    summation order: the reference is the eager baseline itself, and its float32 rounding (a
    per-rank float32 sum, then a cross-rank one) is PyTorch's, which the rule (written for the
    fused ops against single-process eager) does not bound."""
    calls = (["_allgather_base_"], ["allreduce_"])
    sync_single(ctx, "reference", [3, 1], torch.float64, backend="reference", calls=calls)
    sync_single(ctx, "reference empty rank", [0, 3], torch.float64, backend="reference",
                layout="channels_last", calls=calls)
    sync_dual(ctx, "reference dual", [2, 1], torch.float64, backend="reference",
              calls=(calls[0] * 2, calls[1] * 2))
