"""`triton_bn_train_forward` and `triton_bn_backward`: the composite ops of the op layer
(docs/op_layer.md) as compositions of this backend's launchers, no kernel of their own.

    triton_bn_train_forward = stats, apply, update_running_stats (with running statistics)
    triton_bn_backward      = backward_reduce (where its sums are needed), backward_apply

The composition is `reference.train_forward_steps` / `reference.backward_steps`, the one the
reference ops and the extension's C++ composites (csrc/bn_composite_ops.cpp) run, so the three
backends agree on which steps run for which arguments; the numerics are the primitives'. One
op call from Python instead of three (two) is the point: each custom-op call costs host time
of its own, which on a GPU is the step time of small batches (issue 21).
"""

from __future__ import annotations

from torch import Tensor

from ..reference import backward_steps, train_forward_steps
from ._launch import triton_op
from .apply import _launch_apply
from .backward import _launch_backward_apply, _launch_backward_reduce
from .stats import _launch_stats, _launch_update_running_stats


@triton_op(
    "fused_residual::triton_bn_train_forward",
    mutates_args=("running_mean", "running_var"),
    schema="(Tensor input, Tensor? residual, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
    "Tensor? weight, Tensor? bias, float momentum, float eps, bool save_mask) "
    "-> (Tensor out, Tensor mask, Tensor mean, Tensor var)",
)
def triton_bn_train_forward(
    input: Tensor,
    residual: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float,
    eps: float,
    save_mask: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The unsynchronized training forward: batch (mean, var), the running statistics updated
    in place when given, and bn_apply's (out, mask) on the batch statistics."""
    return train_forward_steps(_launch_stats, _launch_update_running_stats, _launch_apply, input, residual,
                               running_mean, running_var, weight, bias, momentum, eps, save_mask)


@triton_op(
    "fused_residual::triton_bn_backward",
    mutates_args=(),
    schema="(Tensor grad_out, Tensor mask, Tensor input, Tensor mean, Tensor var, Tensor? weight, "
    "float eps, bool training, bool[4] output_mask) "
    "-> (Tensor grad_input, Tensor grad_residual, Tensor grad_weight, Tensor grad_bias)",
)
def triton_bn_backward(
    grad_out: Tensor,
    mask: Tensor,
    input: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    eps: float,
    training: bool,
    output_mask: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_input, grad_residual, grad_weight, grad_bias) of one BatchNorm + residual + ReLU
    from the saved mask; those not asked for in `output_mask` are empty."""
    return backward_steps(_launch_backward_reduce, _launch_backward_apply, grad_out, mask, input, mean, var,
                          weight, eps, training, tuple(output_mask))
