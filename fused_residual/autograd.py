"""The one autograd.Function that composes a fused backend's primitive ops.

Forward: statistics (training only), running-stat update, then the fused
normalize + add + ReLU apply. Backward: the per-channel reduction, then the fused
elementwise step: the fused BatchNorm-add-ReLU backward, not autograd through the pieces.
It saves only the input, the packed 1-bit ReLU mask and per-channel mean/var (plus a
reference to the weight), so the bytes saved are about (1 + 1/(8·itemsize))x the input's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backends import backend_ops


def values_per_channel(input: Tensor) -> int:
    return input.shape[0] * input.shape[2] * input.shape[3]


def fused_forward(
    ops_name: str,
    input: Tensor,
    residual: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    save_mask: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The forward's op sequence; returns (out, mask, mean, var) with mean/var the ones used.

    A SyncBatchNorm would all-reduce (mean, var, count) between `stats` and the rest.
    """
    ops = backend_ops(ops_name)
    if training:
        mean, var = ops.stats(input)
        if running_mean is not None and running_var is not None:
            ops.update_running_stats(
                mean, var, values_per_channel(input), running_mean, running_var, momentum
            )
    else:
        assert running_mean is not None and running_var is not None
        mean, var = running_mean, running_var
    out, mask = ops.apply(input, residual, mean, var, weight, bias, eps, save_mask)
    return out, mask, mean, var


class FusedBatchNormAddReLU(torch.autograd.Function):
    """relu(batch_norm(input) + residual) with a fused backward; see module docstring."""

    @staticmethod
    def forward(
        ctx,
        input: Tensor,
        residual: Tensor | None,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        training: bool,
        momentum: float,
        eps: float,
        ops_name: str,
    ) -> Tensor:
        out, mask, mean, var = fused_forward(
            ops_name, input, residual, weight, bias, running_mean, running_var,
            training, momentum, eps, save_mask=True,
        )
        ctx.save_for_backward(input, mask, mean, var, weight)
        ctx.training = training
        ctx.eps = eps
        ctx.ops_name = ops_name
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        input, mask, mean, var, weight = ctx.saved_tensors
        need_input, need_residual, need_weight, need_bias = ctx.needs_input_grad[:4]
        ops = backend_ops(ctx.ops_name)
        sum_dy = sum_dy_xmu = grad_weight = grad_bias = None
        if (ctx.training and need_input) or need_weight or need_bias:
            # A SyncBatchNorm would all-reduce sum_dy and sum_dy_xmu here.
            sum_dy, sum_dy_xmu, grad_weight = ops.backward_reduce(
                grad_out, mask, input, mean, var, ctx.eps
            )
        grad_input = grad_residual = None
        if need_input or need_residual:
            grad_input, grad_residual = ops.backward_apply(
                grad_out, mask, input, mean, var, weight,
                sum_dy if ctx.training else None,
                sum_dy_xmu if ctx.training else None,
                ctx.eps, values_per_channel(input), need_input, need_residual,
            )
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        else:
            grad_weight = None
        if need_bias:
            grad_bias = sum_dy.to(ctx.bias_dtype)
        return (
            grad_input if need_input else None,
            grad_residual if need_residual else None,
            grad_weight,
            grad_bias,
            None, None, None, None, None, None,
        )
