"""`bn_add_relu`: the functional entry point, its argument checks and the backend choice."""

from __future__ import annotations

import torch
from torch import Tensor

from .autograd import FusedBatchNormAddReLU, fused_forward
from .backends import resolve_backend
from .reference import bn_add_relu_reference

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_per_channel(t: Tensor | None, name: str, input: Tensor) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor or None, got {type(t).__name__}")
    channels = input.shape[1]
    if t.dim() != 1 or t.shape[0] != channels:
        raise ValueError(
            f"{name} must have shape ({channels},) for an input with {channels} channels, "
            f"got {tuple(t.shape)}"
        )
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor, got dtype {t.dtype}")
    if t.device != input.device:
        raise ValueError(f"{name} is on {t.device} but input is on {input.device}")


def check_arguments(
    input: Tensor,
    residual: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    eps: float,
) -> None:
    """Raise a TypeError/ValueError naming the problem for any argument a kernel cannot take."""
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a Tensor, got {type(input).__name__}")
    if input.dim() != 4:
        raise ValueError(f"expected 4-D input (N, C, H, W), got {input.dim()}-D input of shape "
                         f"{tuple(input.shape)}")
    if input.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"input dtype must be float16, bfloat16, float32 or float64, got {input.dtype}")
    if residual is not None:
        if not isinstance(residual, Tensor):
            raise TypeError(f"residual must be a Tensor or None, got {type(residual).__name__}")
        if residual.shape != input.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} does not match input shape "
                             f"{tuple(input.shape)}")
        if residual.dtype != input.dtype:
            raise TypeError(f"residual dtype {residual.dtype} does not match input dtype {input.dtype}")
        if residual.device != input.device:
            raise ValueError(f"residual is on {residual.device} but input is on {input.device}")
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        _check_per_channel(t, name, input)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be given or both be None")
    if not training and running_mean is None:
        raise ValueError("running_mean and running_var must be defined in evaluation mode "
                         "(training=False)")
    if eps < 0 or (training and eps == 0):
        raise ValueError(f"eps must be positive{' in training' if training else ''}, got {eps}")
    if training and input.numel() > 0 and input.shape[0] * input.shape[2] * input.shape[3] == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                         f"{list(input.shape)}")


def _empty_result(input: Tensor, residual: Tensor | None, weight: Tensor | None,
                  bias: Tensor | None) -> Tensor:
    # No values: the output is empty, running stats stay as they are, and gradients (of
    # weight and bias: zeros) still flow through an autograd graph of ordinary ops.
    out = input
    if weight is not None:
        out = out * weight.view(1, -1, 1, 1)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    if residual is not None:
        out = out + residual
    return torch.relu(out)


def bn_add_relu(
    input: Tensor,
    residual: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    backend: str = "auto",
) -> Tensor:
    """Fused `F.relu(F.batch_norm(input, running_mean, running_var, weight, bias, training,
    momentum, eps) + residual)`.

    Updates `running_mean`/`running_var` in place in training mode exactly as `F.batch_norm`
    does (unbiased running variance). `residual=None` gives BatchNorm + ReLU. Differentiable
    with respect to input, residual, weight and bias, in training and eval mode. `backend` is
    "auto", "extension", "triton" or "reference"; see `available_backends`.
    """
    check_arguments(input, residual, running_mean, running_var, weight, bias, training, eps)
    name = resolve_backend(backend, input.device.type)
    if name == "reference":
        return bn_add_relu_reference(
            input, residual, running_mean, running_var, weight, bias, training, momentum, eps
        )
    if input.numel() == 0:
        return _empty_result(input, residual, weight, bias)
    tensors = (input, residual, weight, bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return FusedBatchNormAddReLU.apply(
            input, residual, weight, bias, running_mean, running_var, training, momentum, eps, name
        )
    # Inference: the same ops without the autograd node and without writing a mask.
    out, _, _, _ = fused_forward(
        name, input, residual, weight, bias, running_mean, running_var, training, momentum, eps,
        save_mask=False,
    )
    return out
