"""Argument checks shared by the functional API and the Triton ops: a TypeError or
ValueError that names the argument and the problem (the C++ ops have their twins, as
TORCH_CHECKs, in csrc/op_checks.h).

Where nn.BatchNorm2d (+ add + ReLU) refuses the same input with another exception class
(RuntimeError, NotImplementedError), the error is of a class deriving from both, so that
`except ValueError` / `except TypeError` and `except RuntimeError` callers all catch it
(docs/op_layer.md, "Differences from nn.BatchNorm2d"). The dtype combinations of input and
per-channel tensors are accepted exactly where the installed torch's F.batch_norm accepts
them on that device (`check_dtypes_as_nn`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from ._dynamo import assume_constant_result

# A frozenset: a membership test hashes once instead of comparing four dtypes. These checks
# run on every call of the functional ops, whose per-call host time is part of the issue-21
# budget (the fused ops may cost at most 1.1x eager's per call on tiny tensors), so each one
# reads a tensor attribute once and builds a message only when it raises.
FLOAT_DTYPES = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))


class ShapeError(ValueError, RuntimeError):
    """A tensor's shape does not fit the input's (nn.BatchNorm2d: RuntimeError)."""


class DeviceError(ValueError, RuntimeError):
    """A tensor is not on the input's device (nn.BatchNorm2d: RuntimeError)."""


class DtypeError(TypeError, RuntimeError):
    """A dtype, or a combination of dtypes, that F.batch_norm refuses (RuntimeError)."""


class UnsupportedDtypeError(TypeError, NotImplementedError):
    """An input dtype without kernels (nn.BatchNorm2d: NotImplementedError)."""


class RunningStatsError(ValueError, RuntimeError):
    """Evaluation mode without running statistics (F.batch_norm: RuntimeError)."""


def check_input(input: Tensor) -> None:
    """A 4-D (N, C, H, W) tensor of a supported floating dtype."""
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a Tensor, got {type(input).__name__}")
    if input.dim() != 4:
        raise ValueError(f"expected 4-D input (N, C, H, W), got {input.dim()}-D input of shape "
                         f"{tuple(input.shape)}")
    if input.dtype not in FLOAT_DTYPES:
        raise UnsupportedDtypeError(f"input dtype must be float16, bfloat16, float32 or float64, got "
                                    f"{input.dtype}")


def check_like_input(t: Tensor, input: Tensor, name: str) -> None:
    """`t` (a residual, grad_out, a second BatchNorm's input) matches `input` in shape, dtype
    and device."""
    check_like(t, input.shape, input.dtype, input.device, name)


def check_like(t: Tensor, shape: torch.Size, dtype: torch.dtype, device: torch.device, name: str) -> None:
    """`check_like_input` against an input's shape, dtype and device read once by the caller."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.shape != shape:
        raise ShapeError(f"{name} shape {tuple(t.shape)} does not match input shape {tuple(shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{name} dtype {t.dtype} does not match input dtype {dtype}")
    if t.device != device:
        raise DeviceError(f"{name} is on {t.device} but input is on {device}")


def check_per_channel(t: Tensor | None, channels: int, device: torch.device,
                      name: str) -> torch.dtype | None:
    """A per-channel vector (weight, bias, running or batch statistics): None, or 1-D of
    length C, floating, on the input's device. Returns its dtype (read once, here), for the
    caller's mixed-dtype rule."""
    if t is None:
        return None
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor or None, got {type(t).__name__}")
    if t.shape != (channels,):  # one read: cheaper than dim() and numel()
        raise ShapeError(f"{name} must have shape ({channels},) for an input with {channels} channels, "
                         f"got {tuple(t.shape)}")
    dtype = t.dtype
    if dtype not in FLOAT_DTYPES:
        raise DtypeError(f"{name} must be a floating tensor, got dtype {dtype}")
    if t.device != device:
        raise DeviceError(f"{name} is on {t.device} but input is on {device}")
    return dtype


# --------------------------------------------------------------------------------------
# Mixed dtypes: nn.BatchNorm2d's rule, asked of the installed torch. F.batch_norm accepts
# an input whose per-channel tensors (weight, bias, running_mean, running_var) all have its
# dtype; other combinations depend on the device and its kernel (on CPU: float16/bfloat16
# input with float32 per-channel tensors only; on CUDA what cuDNN or the native kernels take)
# and on the torch release. So the first call with a new combination runs F.batch_norm on a
# (2, 1, 1, 1) tensor of those dtypes, outside any tracing, and the answer is kept.
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _plain_eager() -> Iterator[None]:
    """Run real tensors eagerly here even inside torch.export / torch.compile tracing (fake
    and proxy dispatch modes), torch.jit.trace and autocast, none of which may see or change
    the probe."""
    from torch.utils._python_dispatch import _disable_current_modes

    tracing_state = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)
    try:
        with _disable_current_modes(), torch._C._DisableAutocast():
            yield
    finally:
        torch._C._set_tracing_state(tracing_state)


def _ask_nn(device_type: str, input_dtype: torch.dtype, dtypes: tuple[torch.dtype | None, ...],
            training: bool, eps: float) -> tuple[bool, str] | None:
    """None when F.batch_norm takes an input of `input_dtype` with (weight, bias,
    running_mean, running_var) of `dtypes` (None: absent) on `device_type`; else whether its
    error was a NotImplementedError, and its message."""
    with _plain_eager():
        device = torch.device(device_type)
        x = torch.arange(2.0, device=device).to(input_dtype).view(2, 1, 1, 1)
        w, b, rm, rv = (None if d is None else torch.ones(1, dtype=d, device=device) for d in dtypes)
        try:
            F.batch_norm(x, rm, rv, w, b, training, 0.1, eps)
        except Exception as exc:
            return isinstance(exc, NotImplementedError), str(exc).split("\n")[0]
    return None


_NN_REFUSALS: dict[tuple, tuple[bool, str] | None] = {}  # _ask_nn's answers, by its arguments


# A constant under torch.compile (evaluated once while tracing, like backends.resolve_backend):
# no graph break.
@assume_constant_result
def _refusal(device_type: str, input_dtype: torch.dtype, dtypes: tuple[torch.dtype | None, ...],
             training: bool, eps: float) -> tuple[bool, str] | None:
    key = (device_type, input_dtype, dtypes, training, eps)
    try:
        return _NN_REFUSALS[key]
    except KeyError:
        answer = _NN_REFUSALS[key] = _ask_nn(*key)
        return answer


def check_dtypes_as_nn(input: Tensor, dtypes: tuple[torch.dtype | None, ...], training: bool,
                       eps: float, suffix: str = "") -> None:
    """For a call whose (weight, bias, running_mean, running_var) `dtypes` (None: absent) are
    not all the input's: refuse it where F.batch_norm refuses it on the input's device, with
    an error of nn's class (DtypeError: a RuntimeError; UnsupportedDtypeError: a
    NotImplementedError). check_arguments calls it only for mixed dtypes, which it finds from
    the dtypes check_per_channel read."""
    refusal = _refusal(input.device.type, input.dtype, dtypes, training, eps)
    if refusal is None:
        return
    not_implemented, message = refusal
    names = ("weight", "bias", "running_mean", "running_var")
    given = ", ".join(f"{n}{suffix} {d}" for n, d in zip(names, dtypes, strict=True) if d is not None)
    cls = UnsupportedDtypeError if not_implemented else DtypeError
    raise cls(f"nn.BatchNorm2d refuses input dtype {input.dtype} with {given} on {input.device.type} "
              f"({message}); cast them to one dtype (or, for float16/bfloat16 input, keep the "
              f"parameters and statistics float32 where the device allows it)")


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
