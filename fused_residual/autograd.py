"""The autograd.Functions that compose a fused backend's primitive ops.

`FusedBatchNormAddReLU`, relu(batch_norm(input) + residual). Forward: statistics (training
only), running-stat update, then the fused normalize + add + ReLU apply. Backward: the
per-channel reduction, then the fused elementwise step: the fused BatchNorm-add-ReLU
backward, not autograd through the pieces. It saves only the input, the packed 1-bit ReLU
mask and per-channel mean/var (plus a reference to the weight), so the bytes saved are
about (1 + 1/(8·itemsize))x the input's.

`FusedDualBatchNormAddReLU`, relu(batch_norm(input) + batch_norm(input2)): the tail of a
downsampling block, whose residual is itself a BatchNorm's output. Forward: statistics and
running-stat update of each BatchNorm, then one `bn_dual_apply` pass. Backward: the gradient
of the pre-ReLU sum, dy = grad_out * mask, flows unchanged into both BatchNorms, so each
runs the single-BatchNorm backward (reduce, then apply with no residual gradient) on the
shared mask. Both Functions build on the same per-BatchNorm steps (`batch_statistics`,
`bn_backward`).

Second derivatives (gradient penalties: `torch.autograd.grad(..., create_graph=True)`): the
fused backward ops are not differentiable, so when a backward runs with grad mode on it runs
the same steps with `REFERENCE_OPS`, the op layer in ordinary PyTorch ops, on the saved
tensors: the saved mask gives the ReLU's gradient (its own derivative is 0 almost
everywhere), and in training the batch mean/var are recomputed from the saved input, since
they depend on it. Autograd then differentiates that backward like any other graph.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .backends import REFERENCE_OPS, BackendOps, backend_ops
from .reference import bn_stats_reference, working_layout


def values_per_channel(input: Tensor) -> int:
    n, _, h, w = input.shape  # one shape read: this runs on every training call
    return n * h * w


def batch_statistics(
    ops: BackendOps,
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float,
) -> tuple[Tensor, Tensor]:
    """The (mean, var) one BatchNorm normalizes with: the batch's (updating the running
    statistics when there are any) in training, the running statistics in eval.

    A SyncBatchNorm would all-reduce (mean, var, count) between `stats` and the update.
    """
    if training:
        mean, var = ops.stats(input)
        if running_mean is not None and running_var is not None:
            ops.update_running_stats(
                mean, var, values_per_channel(input), running_mean, running_var, momentum
            )
        return mean, var
    assert running_mean is not None and running_var is not None
    return running_mean, running_var


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
    """The forward's op sequence; returns (out, mask, mean, var) with mean/var the ones used."""
    ops = backend_ops(ops_name)
    mean, var = batch_statistics(ops, input, running_mean, running_var, training, momentum)
    out, mask = ops.apply(input, residual, mean, var, weight, bias, eps, save_mask)
    return out, mask, mean, var


class BatchNormArgs(NamedTuple):
    """One BatchNorm's tensors and options, as F.batch_norm takes them. A NamedTuple: built on
    every module call, where a frozen dataclass's __init__ costs a microsecond."""

    running_mean: Tensor | None
    running_var: Tensor | None
    weight: Tensor | None
    bias: Tensor | None
    training: bool
    momentum: float
    eps: float


def fused_dual_forward(
    ops_name: str, input: Tensor, bn: BatchNormArgs, input2: Tensor, bn2: BatchNormArgs, save_mask: bool
) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """The two-BatchNorm forward: statistics of each, then one bn_dual_apply; returns
    (out, mask, (mean, var), (mean2, var2))."""
    ops = backend_ops(ops_name)
    stats = batch_statistics(ops, input, bn.running_mean, bn.running_var, bn.training, bn.momentum)
    stats2 = batch_statistics(ops, input2, bn2.running_mean, bn2.running_var, bn2.training, bn2.momentum)
    out, mask = ops.dual_apply(input, *stats, bn.weight, bn.bias, input2, *stats2, bn2.weight, bn2.bias,
                               bn.eps, bn2.eps, save_mask)
    return out, mask, stats, stats2


def bn_backward(
    ops: BackendOps,
    grad_out: Tensor,
    mask: Tensor,
    input: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias_dtype: torch.dtype | None,
    training: bool,
    eps: float,
    needs: tuple[bool, bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """One BatchNorm's backward from the output gradient and the saved ReLU mask.

    `needs` = which of (grad_input, grad_residual, grad_weight, grad_bias) are wanted; returns
    them (None where not wanted). In training the batch statistics depend on the input, so
    grad_input needs the per-channel sums of dy and dy·(x - mean); in eval it does not.
    """
    need_input, need_residual, need_weight, need_bias = needs
    sum_dy = sum_dy_xmu = grad_weight = grad_bias = None
    if (training and need_input) or need_weight or need_bias:
        # A SyncBatchNorm would all-reduce sum_dy and sum_dy_xmu here.
        sum_dy, sum_dy_xmu, grad_weight = ops.backward_reduce(grad_out, mask, input, mean, var, eps)
    grad_input = grad_residual = None
    if need_input or need_residual:
        grad_input, grad_residual = ops.backward_apply(
            grad_out, mask, input, mean, var, weight,
            sum_dy if training else None,
            sum_dy_xmu if training else None,
            eps, values_per_channel(input), need_input, need_residual,
        )
    # The reductions are in acc; a parameter of another dtype (a half model) gets its own.
    # (Compared first: `.to` is a dispatcher call even when it returns its input.)
    if need_weight:
        grad_weight = grad_weight if grad_weight.dtype == weight.dtype else grad_weight.to(weight.dtype)
    else:
        grad_weight = None
    if need_bias:
        grad_bias = sum_dy if sum_dy.dtype == bias_dtype else sum_dy.to(bias_dtype)
    return (
        grad_input if need_input else None,
        grad_residual if need_residual else None,
        grad_weight,
        grad_bias,
    )


def backward_ops(ops_name: str) -> BackendOps:
    """The ops a backward runs: the fused backend's, or under grad mode (create_graph=True,
    a double backward to come) the differentiable reference ops."""
    return REFERENCE_OPS if torch.is_grad_enabled() else backend_ops(ops_name)


def backward_statistics(ops: BackendOps, input: Tensor, mean: Tensor, var: Tensor,
                        training: bool) -> tuple[Tensor, Tensor]:
    """The saved (mean, var), or for a differentiable backward in training the batch's,
    recomputed from the input so that their dependence on it is part of the graph."""
    if training and ops is REFERENCE_OPS:
        return bn_stats_reference(input)
    return mean, var


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
        # One attribute (each ctx attribute set and read is a dict operation on every call).
        ctx.options = (training, eps, ops_name, bias.dtype if bias is not None else None)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        input, mask, mean, var, weight = ctx.saved_tensors
        training, eps, ops_name, bias_dtype = ctx.options
        ops = backward_ops(ops_name)
        mean, var = backward_statistics(ops, input, mean, var, training)
        grads = bn_backward(
            ops, grad_out, mask, input, mean, var, weight, bias_dtype, training, eps,
            ctx.needs_input_grad[:4],
        )
        return (*grads, None, None, None, None, None, None)


class FusedDualBatchNormAddReLU(torch.autograd.Function):
    """relu(batch_norm(input) + batch_norm(input2)) with a fused backward; see module docstring.

    Saves both inputs, the one shared mask and each BatchNorm's mean/var: no normalized
    tensor and no sum is kept.
    """

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
    ) -> Tensor:
        # Flat arguments (no containers): what autograd.Function.apply and torch.compile's
        # tracing of it handle best.
        bn = BatchNormArgs(running_mean, running_var, weight, bias, training, momentum, eps)
        bn2 = BatchNormArgs(running_mean2, running_var2, weight2, bias2, training2, momentum2, eps2)
        out, mask, (mean, var), (mean2, var2) = fused_dual_forward(
            ops_name, input, bn, input2, bn2, save_mask=True
        )
        # input2 is saved as given (not in input's layout): a copy made here would carry no
        # autograd history, and a double backward would lose its dependence on input2.
        ctx.save_for_backward(input, input2, mask, mean, var, mean2, var2, weight, weight2)
        ctx.training = (training, training2)
        ctx.eps = (eps, eps2)
        ctx.bias_dtype = tuple(b.dtype if b is not None else None for b in (bias, bias2))
        ctx.ops_name = ops_name
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        input, input2, mask, mean, var, mean2, var2, weight, weight2 = ctx.saved_tensors
        # The mask is in input's working layout (memory order), and the backward ops read a
        # mask in their input's: input2 in input's layout (no copy when it is).
        input2 = input2.contiguous(memory_format=working_layout(input))
        ops = backward_ops(ctx.ops_name)
        needs = ctx.needs_input_grad
        grads = []
        for i, (x, m, v, w) in enumerate(((input, mean, var, weight), (input2, mean2, var2, weight2))):
            need_input, need_weight, need_bias = needs[3 * i: 3 * i + 3]
            m, v = backward_statistics(ops, x, m, v, ctx.training[i])
            grad_input, _, grad_weight, grad_bias = bn_backward(
                ops, grad_out, mask, x, m, v, w, ctx.bias_dtype[i], ctx.training[i], ctx.eps[i],
                (need_input, False, need_weight, need_bias),
            )
            grads += [grad_input, grad_weight, grad_bias]
        return (*grads, *([None] * 11))
