"""Backend registry: which set of primitive ops runs a call, chosen per call and device.

A fused backend is six `torch.library` ops with the same signatures (docs/op_layer.md):
the extension's `fused_residual::bn_*` and the Triton backend's `fused_residual::triton_bn_*`.
"reference" is eager PyTorch and "auto" picks the fastest one available for the device.
Where the chosen backend has no kernel of `bn_dual_apply` (the two-BatchNorm tail) for a
device (`dual_apply_served`), the two-BatchNorm functional computes the second BatchNorm
unfused and runs the single-BatchNorm fused op.
Nothing here is swapped by import-time globals: each call names its backend, and the
choice is made from the tensor's device.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from . import ops as _ops

BACKEND_NAMES = ("extension", "triton", "reference")
_CHOICES = (*BACKEND_NAMES, "auto")


@dataclass(frozen=True)
class BackendOps:
    """One fused backend's primitive ops (the OpOverloads, in the order a step calls them)."""

    name: str
    stats: torch._ops.OpOverload
    update_running_stats: torch._ops.OpOverload
    apply: torch._ops.OpOverload
    backward_reduce: torch._ops.OpOverload
    backward_apply: torch._ops.OpOverload
    dual_apply: torch._ops.OpOverload


_OP_PREFIX = {"extension": "", "triton": "triton_"}


def backend_ops(name: str) -> BackendOps:
    """The primitive ops of fused backend `name` ("extension" or "triton")."""
    if name == "triton":
        from . import triton as _triton  # registers the triton_bn_* ops on first use

        if not _triton.TRITON_AVAILABLE:
            raise ValueError("backend 'triton' is unavailable: triton is not installed")
    prefix = _OP_PREFIX[name]
    namespace = torch.ops.fused_residual
    return BackendOps(
        name,
        *(getattr(namespace, prefix + op).default for op in _ops.OP_NAMES),
    )


def _extension_serves(device_type: str) -> bool:
    if not _ops.EXTENSION_LOADED:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "fused_residual::bn_apply", key
    )


# Constant under torch.compile, like resolve_backend: no graph break.
@torch.compiler.assume_constant_result
def dual_apply_served(name: str, device_type: str) -> bool:
    """Whether fused backend `name` has a `bn_dual_apply` kernel for `device_type`: the
    extension where its build registered one for that dispatch key (CPU and CUDA builds
    do), the Triton backend wherever it runs."""
    if name == "extension":
        key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
        return (_extension_serves(device_type) and key is not None
                and torch._C._dispatch_has_kernel_for_dispatch_key("fused_residual::bn_dual_apply", key))
    return _serves(name, device_type)


def _triton_serves(device_type: str) -> bool:
    try:
        from . import triton as _triton
    except Exception:
        return False
    return _triton.available(device_type)


def _device_type(device: torch.device | str | None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device).type


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """The backend names usable for `device` here (default: CUDA if present, else CPU).

    The fused backends come first, in the order "auto" prefers them; "reference" is always
    available.
    """
    device_type = _device_type(device)
    names = [name for name in _preference(device_type) if _serves(name, device_type)]
    return [*names, "reference"]


def _preference(device_type: str) -> tuple[str, ...]:
    # On CPU only the C++ kernels are fast (the Triton interpreter is a test vehicle, never
    # picked by "auto"). On CUDA, Triton first: its kernels are the ones exercised by the
    # test suite on every machine (through the interpreter) until a GPU run shows the CUDA
    # kernels faster per shape.
    return ("extension", "triton") if device_type == "cpu" else ("triton", "extension")


def _serves(name: str, device_type: str) -> bool:
    if name == "extension":
        return _extension_serves(device_type)
    if name == "triton":
        return _triton_serves(device_type)
    return name == "reference"


_warned_fallback = False


def check_backend_name(backend: str) -> None:
    if backend not in _CHOICES:
        raise ValueError(f"unknown backend {backend!r}; choose one of {list(_CHOICES)}")


# torch.compile evaluates this once per (backend, device type) while tracing and keeps the
# answer as a constant, so resolving a backend never breaks the graph.
@torch.compiler.assume_constant_result
def resolve_backend(backend: str, device_type: str) -> str:
    """Turn a user's backend choice into a concrete name for a device type, or raise ValueError."""
    if backend not in _CHOICES:
        raise ValueError(
            f"unknown backend {backend!r}; choose one of {list(_CHOICES)} "
            f"(available for {device_type}: {available_backends(device_type)})"
        )
    if backend == "auto":
        for name in _preference(device_type):
            if _serves(name, device_type) and not (name == "triton" and device_type == "cpu"):
                return name
        _warn_fallback(device_type)
        return "reference"
    if backend != "reference" and not _serves(backend, device_type):
        why = ""
        if backend == "extension" and not _ops.EXTENSION_LOADED:
            why = f" (the extension failed to load: {_ops.EXTENSION_ERROR})"
        raise ValueError(
            f"backend {backend!r} is unavailable for {device_type} tensors here{why}; "
            f"available: {available_backends(device_type)}"
        )
    return backend


def _warn_fallback(device_type: str) -> None:
    global _warned_fallback
    if _warned_fallback:
        return
    _warned_fallback = True
    reason = _ops.EXTENSION_ERROR or f"no fused kernels for {device_type} tensors here"
    warnings.warn(
        f"fused_residual: backend 'auto' falls back to the unfused 'reference' backend ({reason})",
        RuntimeWarning,
        stacklevel=3,
    )
