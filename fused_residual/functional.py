"""The functional entry points, their argument checks and the backend choice:
`bn_add_relu` (one BatchNorm, an optional residual) and `dual_bn_add_relu` (two BatchNorms
feeding one add: the tail of a downsampling residual block)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .autograd import (
    BatchNormArgs,
    FusedBatchNormAddReLU,
    FusedDualBatchNormAddReLU,
    fused_dual_forward,
)
from .backends import backend_ops, device_type_of, dual_apply_served, resolve_backend
from .checks import (
    RunningStatsError,
    check_dtypes_as_nn,
    check_input,
    check_like,
    check_like_input,
    check_per_channel,
)
from .decompositions import exporting_unfused
from .reference import bn_add_relu_reference, dual_bn_add_relu_reference


def _torch_takes_zero_eps_in_eval() -> bool:
    """Whether the installed torch's F.batch_norm accepts eps=0 in evaluation mode (torch 2.11
    raises ValueError; later releases accept it). The functional ops follow it, so that
    BatchNormAddReLU2d takes what the installed nn.BatchNorm2d takes. Asked once, at import."""
    one = torch.ones(1)
    try:
        F.batch_norm(one.view(1, 1, 1, 1), one - 1, one, training=False, eps=0.0)
    except ValueError:
        return False
    return True


_ZERO_EPS_IN_EVAL = _torch_takes_zero_eps_in_eval()


def check_arguments(
    input: Tensor,
    residual: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    eps: float,
    *,
    suffix: str = "",
    synchronized: bool = False,
) -> None:
    """Raise a TypeError/ValueError naming the problem for any argument a kernel cannot take.

    `suffix` is appended to the argument names in messages ("2": the second BatchNorm of
    `dual_bn_add_relu`, whose input was already checked against the first's). `synchronized`:
    the statistics span every rank's batch, so one rank may hold a single value per channel.
    """
    check_input(input)
    # Read once: each tensor attribute read costs a fraction of a microsecond, and this runs
    # on every call (see checks.FLOAT_DTYPES).
    shape, device, dtype = input.shape, input.device, input.dtype
    channels = shape[1]
    if residual is not None:
        check_like(residual, shape, dtype, device, "residual")
    md = vd = wd = bd = None  # the per-channel dtypes, as check_per_channel read them
    if running_mean is not None:
        md = check_per_channel(running_mean, channels, device, "running_mean" + suffix)
    if running_var is not None:
        vd = check_per_channel(running_var, channels, device, "running_var" + suffix)
    if weight is not None:
        wd = check_per_channel(weight, channels, device, "weight" + suffix)
    if bias is not None:
        bd = check_per_channel(bias, channels, device, "bias" + suffix)
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"running_mean{suffix} and running_var{suffix} must both be given or both be None")
    if not training and running_mean is None:
        raise RunningStatsError(f"running_mean{suffix} and running_var{suffix} must be defined in "
                                f"evaluation mode (training{suffix}=False)")
    if eps < 0 or (eps == 0 and (training or not _ZERO_EPS_IN_EVAL)):
        where = " in training" if training and _ZERO_EPS_IN_EVAL else ""
        raise ValueError(f"eps{suffix} must be positive{where}, got {eps}")
    if training and not synchronized and shape[0] * shape[2] * shape[3] == 1 and shape[1] > 0:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                         f"{list(shape)}")
    if ((md is not None and md is not dtype) or (vd is not None and vd is not dtype)
            or (wd is not None and wd is not dtype) or (bd is not None and bd is not dtype)):
        check_dtypes_as_nn(input, (wd, bd, md, vd), training, eps, suffix)  # mixed: nn's rule


def _needs_autograd(*tensors: Tensor | None) -> bool:
    """Whether a call (made in grad mode) must record an autograd node: a tensor requires grad."""
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


def _empty_result(input: Tensor, residual: Tensor | None, weight: Tensor | None,
                  bias: Tensor | None, relu: bool = True) -> Tensor:
    # No values: the output is empty, running stats stay as they are, and gradients (of
    # weight and bias: zeros) still flow through an autograd graph of ordinary ops.
    out = input
    if weight is not None:
        out = out * weight.view(1, -1, 1, 1)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    if residual is not None:
        out = out + residual
    return torch.relu(out) if relu else out


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
    if exporting_unfused():  # (decompositions.py) the unfused composition, checked by F.batch_norm
        return bn_add_relu_reference(
            input, residual, running_mean, running_var, weight, bias, training, momentum, eps
        )
    check_arguments(input, residual, running_mean, running_var, weight, bias, training, eps)
    name = resolve_backend(backend, device_type_of(input))
    if name == "reference":
        return bn_add_relu_reference(
            input, residual, running_mean, running_var, weight, bias, training, momentum, eps
        )
    if input.numel() == 0:
        return _empty_result(input, residual, weight, bias)
    if torch.is_grad_enabled() and _needs_autograd(input, residual, weight, bias):
        return FusedBatchNormAddReLU.apply(
            input, residual, weight, bias, running_mean, running_var, training, momentum, eps, name
        )
    # Inference: the same ops without the autograd node and without writing a mask: in eval
    # one bn_apply on the running statistics (the per-call hot path of an inference model), in
    # training one bn_train_forward.
    ops = backend_ops(name)
    if not training:
        return ops.apply(input, residual, running_mean, running_var, weight, bias, eps, False)[0]
    return ops.train_forward(input, residual, running_mean, running_var, weight, bias, momentum, eps,
                             False)[0]


def dual_bn_add_relu(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    input2: Tensor,
    running_mean2: Tensor | None,
    running_var2: Tensor | None,
    weight2: Tensor | None = None,
    bias2: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    training2: bool | None = None,
    momentum2: float | None = None,
    eps2: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """Fused `F.relu(F.batch_norm(input, running_mean, running_var, weight, bias, training,
    momentum, eps) + F.batch_norm(input2, running_mean2, running_var2, weight2, bias2,
    training2, momentum2, eps2))`: the tail of a downsampling residual block, whose shortcut
    is a 1x1 conv and a BatchNorm.

    One pass reads both inputs and writes the output (and a 1-bit ReLU mask for the
    backward), where eager PyTorch writes and rereads both normalized tensors and their sum.
    `training2`, `momentum2` and `eps2` default to the first BatchNorm's. Running statistics
    are updated in place in training, as F.batch_norm does. Differentiable with respect to
    both inputs, weights and biases. `input2` must have input's shape, dtype and device; any
    strides. Where the chosen backend has no `bn_dual_apply` kernel for the device
    (`backends.dual_apply_served`), the second BatchNorm runs unfused (F.batch_norm) and its
    output is the residual of the single-BatchNorm fused op: the same values, one pass more.
    """
    training2 = training if training2 is None else training2
    momentum2 = momentum if momentum2 is None else momentum2
    eps2 = eps if eps2 is None else eps2
    if exporting_unfused():  # (decompositions.py) the unfused composition, checked by F.batch_norm
        return dual_bn_add_relu_reference(
            input, running_mean, running_var, weight, bias, input2, running_mean2, running_var2,
            weight2, bias2, training, momentum, eps, training2, momentum2, eps2,
        )
    check_arguments(input, None, running_mean, running_var, weight, bias, training, eps)
    check_like_input(input2, input, "input2")
    check_arguments(input2, None, running_mean2, running_var2, weight2, bias2, training2, eps2,
                    suffix="2")
    name = resolve_backend(backend, device_type_of(input))
    if input.numel() == 0:
        return _empty_result(input, _empty_result(input2, None, weight2, bias2, relu=False), weight, bias)
    if name == "reference":
        return dual_bn_add_relu_reference(
            input, running_mean, running_var, weight, bias, input2, running_mean2, running_var2,
            weight2, bias2, training, momentum, eps, training2, momentum2, eps2,
        )
    if not dual_apply_served(name, input.device.type):
        residual = F.batch_norm(input2, running_mean2, running_var2, weight2, bias2, training2,
                                momentum2, eps2)
        return bn_add_relu(input, residual, running_mean, running_var, weight, bias, training,
                           momentum, eps, backend=name)
    if torch.is_grad_enabled() and _needs_autograd(input, weight, bias, input2, weight2, bias2):
        return FusedDualBatchNormAddReLU.apply(
            input, weight, bias, input2, weight2, bias2, running_mean, running_var, running_mean2,
            running_var2, training, training2, momentum, momentum2, eps, eps2, name,
        )
    # Inference: the same ops without the autograd node and without writing a mask.
    out, _, _, _ = fused_dual_forward(
        name, input, BatchNormArgs(running_mean, running_var, weight, bias, training, momentum, eps),
        input2, BatchNormArgs(running_mean2, running_var2, weight2, bias2, training2, momentum2, eps2),
        save_mask=False,
    )
    return out
