"""The extension's primitive ops: loading `fused_residual._C` and their fake kernels.

The schemas live in csrc/ops.cpp (TORCH_LIBRARY) and the kernels per dispatch key in
csrc/cpu/ and csrc/cuda/; docs/op_layer.md is the contract. The fake kernels below give
torch.compile and `torch.library.opcheck` each op's output metadata without running it, and
are shared by the Triton backend's ops, which have the same signatures.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from types import ModuleType

import torch
from torch import Tensor

from .decompositions import register_decompositions
from .reference import acc_dtype, working_layout

OP_NAMES = (
    "bn_stats",
    "bn_update_running_stats",
    "bn_apply",
    "bn_backward_reduce",
    "bn_backward_apply",
    "bn_dual_apply",
    "bn_train_forward",
    "bn_backward",
)


def rebuild_command() -> str:
    """The exact command that rebuilds the extension against the running torch."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.exists(os.path.join(root, "setup.py")):  # a source checkout (editable install)
        return f"cd {root} && pip install --no-build-isolation -e ."
    return ("from the fused_residual source directory: pip install --no-build-isolation . "
            "(plain `pip install .` builds in an isolated environment against the newest torch, "
            "not the installed one)")


def _read_build_info() -> ModuleType | None:
    """fused_residual/_build_info.py, written by setup.py next to _C; None when absent."""
    try:
        return importlib.import_module(f"{__package__}._build_info")
    except ImportError:
        return None


def build_mismatch(build_info: ModuleType | None, torch_version: str) -> str | None:
    """Why an extension built as `build_info` says must not be loaded under `torch_version`
    (its C++ ABI is that torch's exactly), or None."""
    if build_info is None or build_info.TORCH_VERSION == torch_version:
        return None
    return (f"fused_residual._C was compiled against torch {build_info.TORCH_VERSION} (CUDA "
            f"{build_info.TORCH_CUDA_VERSION}) but torch {torch_version} (CUDA {torch.version.cuda}) "
            f"is running")


def _load_extension() -> str | None:
    """Import the compiled extension; return why it is unusable, or None when it loaded."""
    fix = f"To fix, with the torch you run installed first: {rebuild_command()}"
    if importlib.util.find_spec(f"{__package__}._C") is None:
        return f"fused_residual._C is not built. {fix}"
    mismatch = build_mismatch(BUILD_INFO, torch.__version__)
    if mismatch is not None:
        return f"{mismatch}. {fix}"
    try:
        importlib.import_module(f"{__package__}._C")  # loading the library registers the ops
    except Exception as exc:  # ImportError, or an OSError/undefined symbol from a stale build
        return f"fused_residual._C failed to load ({type(exc).__name__}: {exc}). {fix}"
    missing = [name for name in OP_NAMES if not hasattr(torch.ops.fused_residual, name)]
    if len(missing) == len(OP_NAMES):
        return f"fused_residual._C loaded but registered no ops. {fix}"
    if missing:
        return f"fused_residual._C is a stale build without the ops {missing}. {fix}"
    return None


BUILD_INFO: ModuleType | None = _read_build_info()
EXTENSION_ERROR: str | None = _load_extension()
EXTENSION_LOADED: bool = EXTENSION_ERROR is None
if EXTENSION_ERROR is not None:
    # Once per process (a module runs once): the 'extension' backend is off, and "auto" uses
    # the next backend for the device (for CPU tensors: the unfused reference).
    warnings.warn(f"fused_residual: the 'extension' backend is unavailable, so 'auto' runs CPU "
                  f"tensors with the unfused reference: {EXTENSION_ERROR}", RuntimeWarning, stacklevel=2)


def fake_bn_stats(input: Tensor) -> tuple[Tensor, Tensor]:
    channels = input.shape[1]
    acc = acc_dtype(input.dtype)
    return input.new_empty((channels,), dtype=acc), input.new_empty((channels,), dtype=acc)


def fake_bn_update_running_stats(
    mean: Tensor, var: Tensor, count: int, running_mean: Tensor, running_var: Tensor, momentum: float
) -> None:
    return None


def fake_bn_apply(
    input: Tensor,
    residual: Tensor | None,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    save_mask: bool,
) -> tuple[Tensor, Tensor]:
    out = torch.empty_like(input, memory_format=working_layout(input))
    mask_bytes = (input.numel() + 7) // 8 if save_mask else 0
    return out, input.new_empty((mask_bytes,), dtype=torch.uint8)


def fake_bn_dual_apply(
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
    # Outputs are those of bn_apply on `input` (input2 only adds to y).
    return fake_bn_apply(input, None, mean, var, weight, bias, eps, save_mask)


def fake_bn_backward_reduce(
    grad_out: Tensor, mask: Tensor, input: Tensor, mean: Tensor, var: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    channels = input.shape[1]
    acc = acc_dtype(input.dtype)
    return tuple(input.new_empty((channels,), dtype=acc) for _ in range(3))  # type: ignore[return-value]


def fake_bn_backward_apply(
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
    layout = working_layout(input)

    def element_output(needed: bool) -> Tensor:
        if needed:
            return torch.empty_like(input, memory_format=layout)
        return input.new_empty((0,))

    return element_output(need_grad_input), element_output(need_grad_residual)


def fake_bn_train_forward(
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
    # The running statistics are updated in place: no output of theirs.
    mean, var = fake_bn_stats(input)
    out, mask = fake_bn_apply(input, residual, mean, var, weight, bias, eps, save_mask)
    return out, mask, mean, var


def fake_bn_backward(
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
    need_input, need_residual, need_weight, need_bias = output_mask
    grad_input, grad_residual = fake_bn_backward_apply(
        grad_out, mask, input, mean, var, weight, None, None, eps, 1, need_input, need_residual
    )
    channels, acc = input.shape[1], acc_dtype(input.dtype)
    grad_weight, grad_bias = (input.new_empty((channels if needed else 0,), dtype=acc)
                              for needed in (need_weight, need_bias))
    return grad_input, grad_residual, grad_weight, grad_bias


FAKE_KERNELS = {
    "bn_stats": fake_bn_stats,
    "bn_update_running_stats": fake_bn_update_running_stats,
    "bn_apply": fake_bn_apply,
    "bn_backward_reduce": fake_bn_backward_reduce,
    "bn_backward_apply": fake_bn_backward_apply,
    "bn_dual_apply": fake_bn_dual_apply,
    "bn_train_forward": fake_bn_train_forward,
    "bn_backward": fake_bn_backward,
}

if EXTENSION_LOADED:
    for _name, _fake in FAKE_KERNELS.items():
        torch.library.register_fake(f"fused_residual::{_name}")(_fake)
    register_decompositions()  # aten twins for exporters (decompositions.py)
