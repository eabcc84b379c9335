"""Pure-PyTorch reference: the numerics every backend is tested against.

`bn_add_relu_reference` (and `dual_bn_add_relu_reference`, the two-BatchNorm tail of a
downsampling block) is the eager composition the project replaces (and the baseline of
every benchmark). The `*_reference` functions below are the six primitive ops of the op
layer (docs/op_layer.md) written with plain tensor ops, so each kernel can be checked op by
op, including its packed mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def bn_add_relu_reference(
    input: Tensor,
    residual: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """`relu(batch_norm(input) + residual)` in eager PyTorch (four kernels or more)."""
    out = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if residual is not None:
        out = out + residual
    return F.relu(out)


def dual_bn_add_relu_reference(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    input2: Tensor,
    running_mean2: Tensor | None,
    running_var2: Tensor | None,
    weight2: Tensor | None,
    bias2: Tensor | None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    training2: bool | None = None,
    momentum2: float | None = None,
    eps2: float | None = None,
) -> Tensor:
    """`relu(batch_norm(input) + batch_norm(input2))` in eager PyTorch: the tail of a
    downsampling block (the second BatchNorm's options default to the first's)."""
    out = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    out2 = F.batch_norm(
        input2, running_mean2, running_var2, weight2, bias2,
        training if training2 is None else training2,
        momentum if momentum2 is None else momentum2,
        eps if eps2 is None else eps2,
    )
    return F.relu(out + out2)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics and accumulation dtype: float64 for float64 input, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def working_layout(input: Tensor) -> torch.memory_format:
    """channels_last when `input` is channels_last-contiguous and not plain contiguous."""
    if not input.is_contiguous() and input.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _memory_order(t: Tensor, layout: torch.memory_format) -> Tensor:
    """The elements of a 4-D tensor as a 1-D tensor in the working layout's memory order."""
    if layout == torch.channels_last:
        return t.permute(0, 2, 3, 1).reshape(-1)
    return t.reshape(-1)


def pack_mask(bits: Tensor, layout: torch.memory_format) -> Tensor:
    """Pack a bool tensor into the op layer's uint8 mask (LSB-first, memory order)."""
    flat = _memory_order(bits, layout).to(torch.uint8)
    pad = (-flat.numel()) % 8
    flat = torch.cat([flat, flat.new_zeros(pad)]).view(-1, 8)
    weights = (1 << torch.arange(8, device=bits.device, dtype=torch.int32)).to(torch.uint8)
    return (flat * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack_mask(mask: Tensor, shape: torch.Size, layout: torch.memory_format) -> Tensor:
    """The inverse of `pack_mask`: a bool tensor of `shape` (N, C, H, W)."""
    n, c, h, w = shape
    shifts = torch.arange(8, device=mask.device, dtype=torch.uint8)
    bits = ((mask.view(-1, 1) >> shifts) & 1).view(-1)[: n * c * h * w].bool()
    if layout == torch.channels_last:
        return bits.view(n, h, w, c).permute(0, 3, 1, 2)
    return bits.view(n, c, h, w)


def _per_channel(t: Tensor | None, acc: torch.dtype, default: float, c: int, device) -> Tensor:
    if t is None:
        return torch.full((c,), default, dtype=acc, device=device)
    return t.to(acc)


def _bcast(t: Tensor) -> Tensor:
    return t.view(1, -1, 1, 1)


def bn_stats_reference(input: Tensor) -> tuple[Tensor, Tensor]:
    x = input.to(acc_dtype(input.dtype))
    return x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)


def bn_update_running_stats_reference(
    mean: Tensor, var: Tensor, count: int, running_mean: Tensor, running_var: Tensor, momentum: float
) -> None:
    acc = acc_dtype(mean.dtype)
    new_mean = (1 - momentum) * running_mean.to(acc) + momentum * mean.to(acc)
    new_var = (1 - momentum) * running_var.to(acc) + momentum * var.to(acc) * (count / (count - 1))
    running_mean.copy_(new_mean)
    running_var.copy_(new_var)


def bn_apply_reference(
    input: Tensor,
    residual: Tensor | None,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    save_mask: bool,
) -> tuple[Tensor, Tensor]:
    acc = acc_dtype(input.dtype)
    c = input.shape[1]
    invstd = torch.rsqrt(var.to(acc) + eps)
    w = _per_channel(weight, acc, 1.0, c, input.device)
    b = _per_channel(bias, acc, 0.0, c, input.device)
    y = (input.to(acc) - _bcast(mean.to(acc))) * _bcast(invstd * w) + _bcast(b)
    if residual is not None:
        y = y + residual.to(acc)
    return _relu_out(y, input, save_mask)


def bn_dual_apply_reference(
    input: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    input2: Tensor,
    mean2: Tensor,
    var2: Tensor,
    weight2: Tensor | None,
    bias2: Tensor | None,
    eps: float,
    eps2: float,
    save_mask: bool,
) -> tuple[Tensor, Tensor]:
    """`bn_apply` with a second normalized input in place of the residual:
    `y = (x - mean) * invstd * w + b + (x2 - mean2) * invstd2 * w2 + b2` in acc, then ReLU;
    outputs in `input`'s working layout."""
    acc = acc_dtype(input.dtype)
    c = input.shape[1]

    def normalized(x: Tensor, m: Tensor, v: Tensor, w: Tensor | None, b: Tensor | None,
                   e: float) -> Tensor:
        scale = torch.rsqrt(v.to(acc) + e) * _per_channel(w, acc, 1.0, c, x.device)
        return (x.to(acc) - _bcast(m.to(acc))) * _bcast(scale) + _bcast(_per_channel(b, acc, 0.0, c,
                                                                                     x.device))

    y = normalized(input, mean, var, weight, bias, eps) + normalized(input2, mean2, var2, weight2,
                                                                      bias2, eps2)
    return _relu_out(y, input, save_mask)


def _relu_out(y: Tensor, input: Tensor, save_mask: bool) -> tuple[Tensor, Tensor]:
    """`(relu(y) in input's dtype and working layout, packed mask of y > 0)` of an apply op."""
    layout = working_layout(input)
    out = torch.where(y < 0, torch.zeros_like(y), y).to(input.dtype)
    out = out.contiguous(memory_format=layout)
    mask = pack_mask(y > 0, layout) if save_mask else input.new_empty((0,), dtype=torch.uint8)
    return out, mask


def _relu_grad(grad_out: Tensor, mask: Tensor, input: Tensor, acc: torch.dtype) -> Tensor:
    bits = unpack_mask(mask, input.shape, working_layout(input))
    return torch.where(bits, grad_out.to(acc), torch.zeros((), dtype=acc, device=input.device))


def bn_backward_reduce_reference(
    grad_out: Tensor, mask: Tensor, input: Tensor, mean: Tensor, var: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    acc = acc_dtype(input.dtype)
    dy = _relu_grad(grad_out, mask, input, acc)
    sum_dy = dy.sum(dim=(0, 2, 3))
    sum_dy_xmu = (dy * (input.to(acc) - _bcast(mean.to(acc)))).sum(dim=(0, 2, 3))
    return sum_dy, sum_dy_xmu, sum_dy_xmu * torch.rsqrt(var.to(acc) + eps)


def bn_backward_apply_reference(
    grad_out: Tensor,
    mask: Tensor,
    input: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    sum_dy: Tensor | None,
    sum_dy_xmu: Tensor | None,
    eps: float,
    count: int,
    need_grad_input: bool,
    need_grad_residual: bool,
) -> tuple[Tensor, Tensor]:
    acc = acc_dtype(input.dtype)
    layout = working_layout(input)
    c = input.shape[1]
    dy = _relu_grad(grad_out, mask, input, acc)
    empty = input.new_empty((0,))
    grad_residual = dy.to(input.dtype).contiguous(memory_format=layout) if need_grad_residual else empty
    if not need_grad_input:
        return empty, grad_residual
    invstd = torch.rsqrt(var.to(acc) + eps)
    w = _per_channel(weight, acc, 1.0, c, input.device)
    if sum_dy is None:
        grad_input = dy * _bcast(w * invstd)
    else:
        xmu = input.to(acc) - _bcast(mean.to(acc))
        mean_dy = _bcast(sum_dy.to(acc) / count)
        mean_dy_xmu = _bcast(sum_dy_xmu.to(acc) / count)
        grad_input = _bcast(w * invstd) * (dy - mean_dy - xmu * _bcast(invstd * invstd) * mean_dy_xmu)
    return grad_input.to(input.dtype).contiguous(memory_format=layout), grad_residual


# --------------------------------------------------------------------------------------
# The composite ops (docs/op_layer.md): the primitives' steps in one call. `train_forward_steps`
# and `backward_steps` are the composition itself, shared by the reference below and by the
# Triton backend (which passes its launchers); the extension's C++ ops
# (csrc/bn_composite_ops.cpp) make the same calls.
# --------------------------------------------------------------------------------------


def values_per_channel(input: Tensor) -> int:
    n, _, h, w = input.shape  # one shape read: this runs on every training call
    return n * h * w


def train_forward_steps(stats, update_running_stats, apply, input: Tensor, residual: Tensor | None,
                        running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None,
                        bias: Tensor | None, momentum: float, eps: float,
                        save_mask: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """bn_train_forward from the primitives: `stats`, `apply` on the batch statistics, then
    `update_running_stats` (when running statistics are given)."""
    if (running_mean is None) != (running_var is None):
        raise ValueError("fused_residual: running_mean and running_var must both be given or both be None")
    mean, var = stats(input)
    out, mask = apply(input, residual, mean, var, weight, bias, eps, save_mask)
    # The update last: every argument has passed its op's checks before anything is written.
    if running_mean is not None:
        update_running_stats(mean, var, values_per_channel(input), running_mean, running_var, momentum)
    return out, mask, mean, var


def backward_steps(backward_reduce, backward_apply, grad_out: Tensor, mask: Tensor, input: Tensor,
                   mean: Tensor, var: Tensor, weight: Tensor | None, eps: float, training: bool,
                   output_mask: tuple[bool, bool, bool, bool]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """bn_backward from the primitives `backward_reduce` and `backward_apply`: the reduction
    only where its sums are needed (training grad_input, grad_weight, grad_bias), an output not
    asked for in `output_mask` an empty (0,) tensor of its dtype."""
    need_input, need_residual, need_weight, need_bias = output_mask
    sum_dy = sum_dy_xmu = grad_weight = None
    if (training and need_input) or need_weight or need_bias:
        sum_dy, sum_dy_xmu, grad_weight = backward_reduce(grad_out, mask, input, mean, var, eps)
    if need_input or need_residual:
        grad_input, grad_residual = backward_apply(
            grad_out, mask, input, mean, var, weight, sum_dy if training else None,
            sum_dy_xmu if training else None, eps, values_per_channel(input), need_input, need_residual,
        )
    else:  # each output its own tensor, never one shared by two
        grad_input, grad_residual = input.new_empty((0,)), input.new_empty((0,))
    acc = acc_dtype(input.dtype)
    return (grad_input, grad_residual,
            grad_weight if need_weight else input.new_empty((0,), dtype=acc),
            sum_dy if need_bias else input.new_empty((0,), dtype=acc))


def bn_train_forward_reference(
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
    return train_forward_steps(bn_stats_reference, bn_update_running_stats_reference, bn_apply_reference,
                               input, residual, running_mean, running_var, weight, bias, momentum, eps,
                               save_mask)


def bn_backward_reference(
    grad_out: Tensor,
    mask: Tensor,
    input: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    eps: float,
    training: bool,
    output_mask: tuple[bool, bool, bool, bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return backward_steps(bn_backward_reduce_reference, bn_backward_apply_reference, grad_out, mask,
                          input, mean, var, weight, eps, training, output_mask)
