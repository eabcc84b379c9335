"""The autograd.Functions of the synchronized fused tail: a backend's primitive ops with the
two collectives of `collectives.py` between them (docs/op_layer.md: the split points).

Forward, per call: `bn_stats` of each training BatchNorm on this rank's batch, ONE all_gather
of the packed (count, mean, M2) rows, the rank-order merge (identical on every rank), the
running-stat update with the global count, then the fused apply (`bn_apply`, or `bn_dual_apply`
for two BatchNorms) on the global statistics. Backward: `bn_backward_reduce` of each BatchNorm
on this rank's batch, ONE all_reduce of the packed (sum_dy, sum_dy_xmu) of every BatchNorm whose
input needs a gradient, then `bn_backward_apply` with the global sums. As in nn.SyncBatchNorm,
the weight and bias gradients are this rank's (DistributedDataParallel averages them), and the
input gradient is the gradient of the sum of every rank's loss.

A rank whose batch is empty (N·H·W = 0; the ops reject it) runs no op but joins both
collectives with zeros, so that no other rank waits forever. The global count stays a tensor
(no host synchronization): `bn_backward_apply` gets the sums already divided by it, with
count = 1.

Second derivatives are refused (RuntimeError): the backward's all_reduce is not differentiable
here, and a double backward that ignored the other ranks' terms would be silently wrong.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..autograd import BatchNormArgs, values_per_channel
from ..backends import BackendOps, backend_ops, dual_apply_served
from ..reference import acc_dtype, bn_dual_apply_reference, working_layout
from .collectives import (
    all_gather_rows,
    all_reduce_mean_sums,
    merge_moments,
    pack_moments,
    refuse_double_backward,
    update_running_stats,
)


def synced_statistics(
    ops: BackendOps, inputs: list[Tensor], bns: list[BatchNormArgs], group_name: str, world_size: int
) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
    """(global count, each BatchNorm's (mean, var)): the global batch statistics of the training
    BatchNorms (running statistics updated), the running statistics of the others. One
    all_gather; the inputs share one shape, hence one count."""
    count = values_per_channel(inputs[0])
    training = [x for x, bn in zip(inputs, bns, strict=True) if bn.training]
    moments = [ops.stats(x) for x in training] if count > 0 else []
    channels = inputs[0].shape[1]
    row = pack_moments(count, moments, len(training), channels, inputs[0].device)
    gathered = all_gather_rows(row, group_name, world_size)
    total, merged = merge_moments(gathered, len(training), channels, acc_dtype(inputs[0].dtype))
    stats, merged_iter = [], iter(merged)
    for bn in bns:
        if not bn.training:
            stats.append((bn.running_mean, bn.running_var))
            continue
        mean, var = next(merged_iter)
        if bn.running_mean is not None and bn.running_var is not None:
            update_running_stats(mean, var, total, bn.running_mean, bn.running_var, bn.momentum)
        stats.append((mean, var))
    return total, stats


def _empty_outputs(input: Tensor) -> tuple[Tensor, Tensor]:
    """(out, mask) of a rank with no values: an empty output of the input's shape."""
    return (torch.empty_like(input, memory_format=working_layout(input)),
            input.new_empty((0,), dtype=torch.uint8))


def sync_forward(
    ops_name: str, input: Tensor, residual: Tensor | None, bn: BatchNormArgs, group_name: str,
    world_size: int, save_mask: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The single-BatchNorm forward; returns (out, mask, mean, var, global count)."""
    ops = backend_ops(ops_name)
    total, [(mean, var)] = synced_statistics(ops, [input], [bn], group_name, world_size)
    if values_per_channel(input) == 0:
        return (*_empty_outputs(input), mean, var, total)
    out, mask = ops.apply(input, residual, mean, var, bn.weight, bn.bias, bn.eps, save_mask)
    return out, mask, mean, var, total


def sync_dual_forward(
    ops_name: str, input: Tensor, bn: BatchNormArgs, input2: Tensor, bn2: BatchNormArgs,
    group_name: str, world_size: int, save_mask: bool,
) -> tuple[Tensor, Tensor, list[tuple[Tensor, Tensor]], Tensor]:
    """The two-BatchNorm forward (both statistics in one all_gather); returns (out, mask,
    [(mean, var), (mean2, var2)], global count). Where the backend has no bn_dual_apply kernel
    for the device, its eager reference computes the same values."""
    ops = backend_ops(ops_name)
    total, stats = synced_statistics(ops, [input, input2], [bn, bn2], group_name, world_size)
    if values_per_channel(input) == 0:
        return (*_empty_outputs(input), stats, total)
    dual_apply = ops.dual_apply if dual_apply_served(ops_name, input.device.type) else bn_dual_apply_reference
    (mean, var), (mean2, var2) = stats
    out, mask = dual_apply(input, mean, var, bn.weight, bn.bias, input2, mean2, var2, bn2.weight,
                           bn2.bias, bn.eps, bn2.eps, save_mask)
    return out, mask, stats, total


def synced_backward(
    ops: BackendOps, grad_out: Tensor, mask: Tensor, inputs: list[Tensor],
    stats: list[tuple[Tensor, Tensor]], weights: list[Tensor | None], ctx_info: list[tuple],
    needs: list[tuple[bool, bool, bool, bool]], total: Tensor, group_name: str,
) -> list[tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]]:
    """Every BatchNorm's (grad_input, grad_residual, grad_weight, grad_bias) from the output
    gradient and the shared ReLU mask, with one all_reduce of the sums of the training
    BatchNorms whose input needs a gradient. `ctx_info[i]` = (training, eps, bias dtype);
    `needs[i]` = which of the four gradients are wanted (None where not)."""
    refuse_double_backward()
    local = values_per_channel(inputs[0]) > 0
    reduced = []
    for x, (mean, var), (training, eps, _), (need_input, _, need_weight, need_bias) in zip(
            inputs, stats, ctx_info, needs, strict=True):
        if not ((training and need_input) or need_weight or need_bias):
            reduced.append(None)
        elif local:
            reduced.append(ops.backward_reduce(grad_out, mask, x, mean, var, eps))
        else:  # an empty batch: nothing to sum, but the all_reduce below still needs its part
            zeros = x.new_zeros((x.shape[1],), dtype=acc_dtype(x.dtype))
            reduced.append((zeros, zeros, zeros))
    synced = [i for i, (info, need) in enumerate(zip(ctx_info, needs, strict=True))
              if info[0] and need[0]]
    mean_sums: dict[int, tuple[Tensor, Tensor]] = {}
    if synced:
        sums = all_reduce_mean_sums([s for i in synced for s in reduced[i][:2]], total, group_name)
        mean_sums = {i: (sums[2 * k], sums[2 * k + 1]) for k, i in enumerate(synced)}
    grads = []
    for i, (x, (mean, var), w, (_, eps, bias_dtype), need) in enumerate(zip(
            inputs, stats, weights, ctx_info, needs, strict=True)):
        need_input, need_residual, need_weight, need_bias = need
        grad_input = grad_residual = None
        if (need_input or need_residual) and local:
            mean_dy, mean_dy_xmu = mean_sums.get(i, (None, None))
            grad_input, grad_residual = ops.backward_apply(
                grad_out, mask, x, mean, var, w, mean_dy, mean_dy_xmu, eps, 1, need_input, need_residual)
        elif need_input or need_residual:
            grad_input = grad_residual = torch.empty_like(x)
        grads.append((
            grad_input if need_input else None,
            grad_residual if need_residual else None,
            reduced[i][2].to(w.dtype) if need_weight else None,
            reduced[i][0].to(bias_dtype) if need_bias else None,
        ))
    return grads


class SyncBatchNormAddReLU(torch.autograd.Function):
    """relu(sync_batch_norm(input) + residual) in training, world size > 1; see module docstring."""

    @staticmethod
    def forward(
        ctx,
        input: Tensor,
        residual: Tensor | None,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        momentum: float,
        eps: float,
        ops_name: str,
        group_name: str,
        world_size: int,
    ) -> Tensor:
        bn = BatchNormArgs(running_mean, running_var, weight, bias, True, momentum, eps)
        out, mask, mean, var, total = sync_forward(ops_name, input, residual, bn, group_name,
                                                   world_size, save_mask=True)
        ctx.save_for_backward(input, mask, mean, var, weight, total)
        ctx.info = (True, eps, bias.dtype if bias is not None else None)
        ctx.ops_name, ctx.group_name = ops_name, group_name
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        input, mask, mean, var, weight, total = ctx.saved_tensors
        [grads] = synced_backward(
            backend_ops(ctx.ops_name), grad_out, mask, [input], [(mean, var)], [weight], [ctx.info],
            [tuple(ctx.needs_input_grad[:4])], total, ctx.group_name,
        )
        return (*grads, *([None] * 7))


class SyncDualBatchNormAddReLU(torch.autograd.Function):
    """relu(sync_batch_norm(input) + sync_batch_norm(input2)): both BatchNorms' statistics in
    one all_gather, both BatchNorms' sums in one all_reduce; see module docstring."""

    @staticmethod
    def forward(
        ctx,
        input: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        input2: Tensor,
        weight2: Tensor | None,
        bias2: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        running_mean2: Tensor | None,
        running_var2: Tensor | None,
        training: bool,
        training2: bool,
        momentum: float,
        momentum2: float,
        eps: float,
        eps2: float,
        ops_name: str,
        group_name: str,
        world_size: int,
    ) -> Tensor:
        bn = BatchNormArgs(running_mean, running_var, weight, bias, training, momentum, eps)
        bn2 = BatchNormArgs(running_mean2, running_var2, weight2, bias2, training2, momentum2, eps2)
        out, mask, [(mean, var), (mean2, var2)], total = sync_dual_forward(
            ops_name, input, bn, input2, bn2, group_name, world_size, save_mask=True)
        # The backward ops read the mask in their input's memory order: input2 is saved in
        # input's working layout (no copy when it is in it).
        input2 = input2.contiguous(memory_format=working_layout(input))
        ctx.save_for_backward(input, input2, mask, mean, var, mean2, var2, weight, weight2, total)
        ctx.info = [(training, eps, bias.dtype if bias is not None else None),
                    (training2, eps2, bias2.dtype if bias2 is not None else None)]
        ctx.ops_name, ctx.group_name = ops_name, group_name
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        input, input2, mask, mean, var, mean2, var2, weight, weight2, total = ctx.saved_tensors
        n = ctx.needs_input_grad
        grads = synced_backward(
            backend_ops(ctx.ops_name), grad_out, mask, [input, input2], [(mean, var), (mean2, var2)],
            [weight, weight2], ctx.info, [(n[0], False, n[1], n[2]), (n[3], False, n[4], n[5])],
            total, ctx.group_name,
        )
        (grad_input, _, grad_weight, grad_bias), (grad_input2, _, grad_weight2, grad_bias2) = grads
        return (grad_input, grad_weight, grad_bias, grad_input2, grad_weight2, grad_bias2,
                *([None] * 13))
