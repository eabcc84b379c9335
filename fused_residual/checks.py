"""Argument checks shared by the functional API and the Triton ops: a TypeError or
ValueError that names the argument and the problem (the C++ ops have their twins, as
TORCH_CHECKs, in csrc/op_checks.h)."""

from __future__ import annotations

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.shape != input.shape:
        raise ValueError(f"{name} shape {tuple(t.shape)} does not match input shape {tuple(input.shape)}")
    if t.dtype != input.dtype:
        raise TypeError(f"{name} dtype {t.dtype} does not match input dtype {input.dtype}")
    if t.device != input.device:
        raise ValueError(f"{name} is on {t.device} but input is on {input.device}")


def check_per_channel(t: Tensor | None, channels: int, device: torch.device, name: str) -> None:
    """A per-channel vector (weight, bias, running or batch statistics): None, or 1-D of
    length C, floating, on the input's device."""
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor or None, got {type(t).__name__}")
    if t.dim() != 1 or t.shape[0] != channels:
        raise ValueError(f"{name} must have shape ({channels},) for an input with {channels} channels, "
                         f"got {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor, got dtype {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but input is on {device}")
