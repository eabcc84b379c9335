"""Argument checks shared by the functional API and the Triton ops: a TypeError or
ValueError that names the argument and the problem (the C++ ops have their twins, as
TORCH_CHECKs, in csrc/op_checks.h)."""

from __future__ import annotations

import torch
from torch import Tensor

# A frozenset: a membership test hashes once instead of comparing four dtypes. These checks
# run on every call of the functional ops, whose per-call host time is part of the issue-21
# budget (the fused ops may cost at most 1.1x eager's per call on tiny tensors), so each one
# reads a tensor attribute once and builds a message only when it raises.
FLOAT_DTYPES = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))


def check_input(input: Tensor) -> None:
    """A 4-D (N, C, H, W) tensor of a supported floating dtype."""
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a Tensor, got {type(input).__name__}")
    if input.dim() != 4:
        raise ValueError(f"expected 4-D input (N, C, H, W), got {input.dim()}-D input of shape "
                         f"{tuple(input.shape)}")
    if input.dtype not in FLOAT_DTYPES:
        raise TypeError(f"input dtype must be float16, bfloat16, float32 or float64, got {input.dtype}")


def check_like_input(t: Tensor, input: Tensor, name: str) -> None:
    """`t` (a residual, grad_out, a second BatchNorm's input) matches `input` in shape, dtype
    and device."""
    check_like(t, input.shape, input.dtype, input.device, name)


def check_like(t: Tensor, shape: torch.Size, dtype: torch.dtype, device: torch.device, name: str) -> None:
    """`check_like_input` against an input's shape, dtype and device read once by the caller."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.shape != shape:
        raise ValueError(f"{name} shape {tuple(t.shape)} does not match input shape {tuple(shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{name} dtype {t.dtype} does not match input dtype {dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but input is on {device}")


def check_per_channel(t: Tensor | None, channels: int, device: torch.device, name: str) -> None:
    """A per-channel vector (weight, bias, running or batch statistics): None, or 1-D of
    length C, floating, on the input's device."""
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor or None, got {type(t).__name__}")
    if t.shape != (channels,):  # one read: cheaper than dim() and numel()
        raise ValueError(f"{name} must have shape ({channels},) for an input with {channels} channels, "
                         f"got {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor, got dtype {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but input is on {device}")


# --------------------------------------------------------------------------------------
# The argument rules of the six ops (docs/op_layer.md), one function per op. The C++ ops
# apply the same rules with the same words (csrc/op_checks.h, `check_*_args`); the Triton
# ops call these. Shared rules: a reduction (bn_stats, bn_backward_reduce) needs
# N*H*W >= 1; an element-wise op accepts N*H*W == 0 (empty outputs); `count` >= 2 for the
# running-variance update and >= 1 for a training bn_backward_apply; the mask is a
# contiguous uint8 tensor of ceil(numel / 8) bytes.
# --------------------------------------------------------------------------------------


def check_reduction_size(input: Tensor) -> None:
    """Batch statistics need N*H*W >= 1 values per channel."""
    n, _, h, w = input.shape
    if n * h * w == 0:
        raise ValueError(f"fused_residual: batch statistics need N*H*W >= 1 values per channel, got "
                         f"input of shape {tuple(input.shape)}")


def check_mask(mask: Tensor, input: Tensor) -> None:
    """The packed ReLU mask of `input`: contiguous uint8 of ceil(numel / 8) bytes, on input's
    device (the kernels index it densely)."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"fused_residual: mask must be a Tensor, got {type(mask).__name__}")
    nbytes = (input.numel() + 7) // 8
    if mask.dtype != torch.uint8:
        raise TypeError(f"fused_residual: mask must be uint8, got {mask.dtype}")
    if mask.dim() != 1 or mask.shape[0] != nbytes:
        raise ValueError(f"fused_residual: mask must have shape ({nbytes},) for an input of "
                         f"{input.numel()} elements, got {tuple(mask.shape)}")
    if not mask.is_contiguous():
        raise ValueError(f"fused_residual: mask must be contiguous, got stride {mask.stride()}")
    if mask.device != input.device:
        raise ValueError(f"fused_residual: mask is on {mask.device} but input is on {input.device}")


def check_count(count: int) -> None:
    if count < 1:
        raise ValueError(f"fused_residual: count (values per channel) must be >= 1, got {count}")


def check_unbiased_count(count: int) -> None:
    if count < 2:
        raise ValueError(f"fused_residual: count (values per channel) must be >= 2 for the unbiased "
                         f"running variance, got {count}")


def check_stats_args(input: Tensor) -> None:
    check_input(input)
    check_reduction_size(input)


def check_update_running_stats_args(mean: Tensor, var: Tensor, count: int, running_mean: Tensor,
                                    running_var: Tensor) -> None:
    if not isinstance(mean, Tensor) or mean.dim() != 1:
        shape = tuple(mean.shape) if isinstance(mean, Tensor) else type(mean).__name__
        raise ValueError(f"fused_residual: mean must be 1-D (C,), got {shape}")
    c = mean.shape[0]
    for name, t in (("mean", mean), ("var", var), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if t is None:
            raise TypeError(f"fused_residual: {name} must be a Tensor, got None")
        check_per_channel(t, c, mean.device, name)
    check_unbiased_count(count)


def check_apply_args(input: Tensor, residual: Tensor | None, mean: Tensor, var: Tensor,
                     weight: Tensor | None, bias: Tensor | None) -> None:
    check_input(input)
    if residual is not None:
        check_like_input(residual, input, "residual")
    _check_channels(input, mean=mean, var=var, weight=weight, bias=bias)


def check_dual_apply_args(input: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None,
                          bias: Tensor | None, input2: Tensor, mean2: Tensor, var2: Tensor,
                          weight2: Tensor | None, bias2: Tensor | None) -> None:
    check_input(input)
    check_like_input(input2, input, "input2")
    _check_channels(input, mean=mean, var=var, weight=weight, bias=bias, mean2=mean2, var2=var2,
                    weight2=weight2, bias2=bias2)


def check_backward_reduce_args(grad_out: Tensor, mask: Tensor, input: Tensor, mean: Tensor,
                               var: Tensor) -> None:
    check_input(input)
    check_reduction_size(input)
    check_like_input(grad_out, input, "grad_out")
    check_mask(mask, input)
    _check_channels(input, mean=mean, var=var)


def check_backward_apply_args(grad_out: Tensor, mask: Tensor, input: Tensor, mean: Tensor, var: Tensor,
                              weight: Tensor | None, sum_dy: Tensor | None, sum_dy_xmu: Tensor | None,
                              count: int) -> None:
    check_input(input)
    check_like_input(grad_out, input, "grad_out")
    check_mask(mask, input)
    _check_channels(input, mean=mean, var=var, weight=weight, sum_dy=sum_dy, sum_dy_xmu=sum_dy_xmu)
    if (sum_dy is None) != (sum_dy_xmu is None):
        raise ValueError("fused_residual: sum_dy and sum_dy_xmu must both be given (training) or both "
                         "be None (eval)")
    if sum_dy is not None:
        check_count(count)


def _check_channels(input: Tensor, **tensors: Tensor | None) -> None:
    """Per-channel arguments of an op: `mean`, `var`, `mean2`, `var2` are required."""
    for name, t in tensors.items():
        if t is None and name in ("mean", "var", "mean2", "var2"):
            raise TypeError(f"fused_residual: {name} must be a Tensor, got None")
        check_per_channel(t, input.shape[1], input.device, name)
