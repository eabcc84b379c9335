"""The unfused synchronized tail: PyTorch's own SyncBatchNorm algorithm, then add and ReLU.

`EagerSyncBatchNorm` follows torch.nn.modules._functions.SyncBatchNorm step by step (per-rank
statistics, all_gather of (mean, statistic, count), the count-weighted merge, running-stat
update, elementwise normalize; backward: per-rank sums, one all_reduce of (sum_dy,
sum_dy_xmu), elementwise input gradient), written with ops that also run on CPU tensors:
nn.SyncBatchNorm refuses CPU tensors and its CUDA-only helpers (torch.batch_norm_stats,
batch_norm_gather_stats_with_counts, batch_norm_elemt, ...) have no CPU kernels. One change:
each rank sends its biased variance where PyTorch sends 1/sqrt(var + eps), which PyTorch then
inverts back to a variance (a lossy round trip); the cost is the same.

This is backend="reference" of the synchronized functionals (eager PyTorch, unfused) and the
baseline of benchmarks/test_sync_bench.py.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ..reference import acc_dtype
from .collectives import refuse_double_backward

_DIMS = (0, 2, 3)


def _bcast(t: Tensor) -> Tensor:
    return t.view(1, -1, 1, 1)


class EagerSyncBatchNorm(torch.autograd.Function):
    """Training-mode batch_norm over the batches of every rank of `group`; see module docstring."""

    @staticmethod
    def forward(ctx, input: Tensor, weight: Tensor | None, bias: Tensor | None,
                running_mean: Tensor | None, running_var: Tensor | None, eps: float,
                momentum: float, group: dist.ProcessGroup, world_size: int) -> Tensor:
        acc = acc_dtype(input.dtype)
        channels = input.shape[1]
        if input.numel() > 0:
            var, mean = torch.var_mean(input.to(acc), dim=_DIMS, unbiased=False)
            count = torch.full((1,), input.numel() // channels, dtype=acc, device=input.device)
            combined = torch.cat([mean, var, count])
        else:  # still joins the all_gather; its zero count is filtered out below
            combined = torch.zeros(2 * channels + 1, dtype=acc, device=input.device)
        gathered = combined.new_empty((world_size * combined.numel(),))
        # all_gather_single is the name from torch 2.12 on (all_gather_into_tensor warns there).
        getattr(dist, "all_gather_single", dist.all_gather_into_tensor)(gathered, combined, group=group)
        gathered = gathered.view(world_size, -1)
        mean_all, var_all, count_all = torch.split(gathered, channels, dim=1)
        keep = count_all.squeeze(-1) >= 1  # as PyTorch: drop empty ranks (a host sync on GPUs)
        mean_all, var_all, count_all = mean_all[keep], var_all[keep], count_all[keep]
        total = count_all.sum()
        mean = (count_all * mean_all).sum(dim=0) / total
        var = (count_all * (var_all + (mean_all - mean) ** 2)).sum(dim=0) / total
        if running_mean is not None and running_var is not None and count_all.numel() > 0:
            running_mean.copy_((1 - momentum) * running_mean + momentum * mean)
            running_var.copy_((1 - momentum) * running_var + momentum * var * total / (total - 1))
        invstd = torch.rsqrt(var + eps)
        ctx.save_for_backward(input, weight, mean, invstd, total)
        ctx.group = group
        ctx.bias_dtype = bias.dtype if bias is not None else None
        if input.numel() == 0:
            return torch.empty_like(input)
        scale = invstd if weight is None else invstd * weight.to(acc)
        out = (input.to(acc) - _bcast(mean)) * _bcast(scale)
        if bias is not None:
            out = out + _bcast(bias.to(acc))
        return out.to(input.dtype)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        refuse_double_backward()
        input, weight, mean, invstd, total = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        channels = input.shape[1]
        grad_input = grad_weight = grad_bias = None
        if input.numel() == 0:
            if need_input:  # join the all_reduce other ranks are in
                dist.all_reduce(torch.zeros(2 * channels, dtype=mean.dtype, device=mean.device),
                                group=ctx.group)
                grad_input = torch.empty_like(input)
            return grad_input, None, None, None, None, None, None, None, None
        dy = grad_output.to(mean.dtype)
        xmu = input.to(mean.dtype) - _bcast(mean)
        sum_dy = dy.sum(dim=_DIMS)
        sum_dy_xmu = (dy * xmu).sum(dim=_DIMS)
        if need_input:
            combined = torch.cat([sum_dy, sum_dy_xmu])
            dist.all_reduce(combined, group=ctx.group)
            global_dy, global_dy_xmu = torch.split(combined, channels)
            scale = invstd if weight is None else invstd * weight.to(mean.dtype)
            grad = dy - _bcast(global_dy / total) - xmu * _bcast(invstd * invstd * global_dy_xmu / total)
            grad_input = (grad * _bcast(scale)).to(input.dtype)
        if need_weight and weight is not None:
            grad_weight = (sum_dy_xmu * invstd).to(weight.dtype)
        if need_bias:
            grad_bias = sum_dy.to(ctx.bias_dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None


def sync_batch_norm_reference(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                              weight: Tensor | None, bias: Tensor | None, training: bool,
                              momentum: float, eps: float, group: dist.ProcessGroup,
                              world_size: int) -> Tensor:
    """One BatchNorm: synchronized in training, F.batch_norm on the running statistics in eval."""
    if not training:
        return F.batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps)
    return EagerSyncBatchNorm.apply(input, weight, bias, running_mean, running_var, eps, momentum,
                                    group, world_size)
