"""Backend registry: which set of primitive ops runs a call, chosen per call and device.

A fused backend is eight `torch.library` ops with the same signatures (docs/op_layer.md):
the extension's `fused_residual::bn_*` and the Triton backend's `fused_residual::triton_bn_*`:
six primitives and two composites of them (the unsynchronized training forward, the backward).
"reference" is eager PyTorch and "auto" picks the fastest one available for the device.
Where the chosen backend has no kernel of `bn_dual_apply` (the two-BatchNorm tail) for a
device (`dual_apply_served`), the two-BatchNorm functional computes the second BatchNorm
unfused and runs the single-BatchNorm fused op.
Nothing here is swapped by import-time globals: each call names its backend, and the
choice is made from the tensor's device.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import ops as _ops
from . import reference as _reference
from ._dynamo import assume_constant_result

BACKEND_NAMES = ("extension", "triton", "reference")
_CHOICES = (*BACKEND_NAMES, "auto")


@dataclass(frozen=True)
class BackendOps:
    """One backend's ops (fused_residual.ops.OP_NAMES): the primitives in the order a step calls
    them, then the composites; a fused backend's OpOverloads, or the reference's plain-PyTorch
    functions (`REFERENCE_OPS`)."""

    name: str
    stats: Callable
    update_running_stats: Callable
    apply: Callable
    backward_reduce: Callable
    backward_apply: Callable
    dual_apply: Callable
    train_forward: Callable
    backward: Callable


# The op layer written in ordinary (differentiable) PyTorch ops. The autograd.Functions run
# their backward with these when it must itself be differentiable (create_graph=True).
REFERENCE_OPS = BackendOps(
    "reference",
    _reference.bn_stats_reference,
    _reference.bn_update_running_stats_reference,
    _reference.bn_apply_reference,
    _reference.bn_backward_reduce_reference,
    _reference.bn_backward_apply_reference,
    _reference.bn_dual_apply_reference,
    _reference.bn_train_forward_reference,
    _reference.bn_backward_reference,
)


_OP_PREFIX = {"extension": "", "triton": "triton_"}


# Per-call host time matters (issue 21: on a GPU, small-batch steps are launch-bound), so what
# cannot change within a process is looked up once: each fused backend's OpOverloads (the op
# registrations are made at import and never removed) and the extension's availability per
# device type (fixed once `fused_residual.ops` has loaded, or failed to load, `_C`).
_BACKEND_OPS: dict[str, BackendOps] = {}


def backend_ops(name: str) -> BackendOps:
    """The primitive ops of fused backend `name` ("extension" or "triton")."""
    found = _BACKEND_OPS.get(name)
    if found is not None:
        return found
    if name == "triton":
        from . import triton as _triton  # registers the triton_bn_* ops on first use

        if not _triton.TRITON_AVAILABLE:
            raise ValueError("backend 'triton' is unavailable: triton is not installed")
    prefix = _OP_PREFIX[name]
    namespace = torch.ops.fused_residual
    found = BackendOps(
        name,
        *(getattr(namespace, prefix + op).default for op in _ops.OP_NAMES),
    )
    _BACKEND_OPS[name] = found
    return found


_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
_NO_GPU = "no CUDA GPU is visible (torch.cuda.is_available() is False)"


def _has_kernel(op: str, device_type: str) -> bool:
    key = _DISPATCH_KEYS.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_residual::{op}", key)


def _extension_unavailable(device_type: str) -> str | None:
    if not _ops.EXTENSION_LOADED:
        return _ops.EXTENSION_ERROR
    if not _has_kernel("bn_apply", device_type):
        if device_type != "cuda":
            return f"no kernels for {device_type} tensors"
        why = _ops.BUILD_INFO.WHY_NO_CUDA if _ops.BUILD_INFO is not None else "unknown"
        return (f"the extension was built without CUDA kernels ({why}); rebuild it with torch's "
                f"CUDA build and nvcc: {_ops.rebuild_command()}")
    if device_type == "cuda" and not torch.cuda.is_available():
        return _NO_GPU
    return None


def _triton_unavailable(device_type: str) -> str | None:
    try:
        from . import triton as _triton
    except Exception as exc:
        return f"fused_residual.triton failed to import ({type(exc).__name__}: {exc})"
    if not _triton.TRITON_AVAILABLE:
        return "triton is not installed (pip install triton)"
    if device_type == "cuda" and not torch.cuda.is_available():
        return _NO_GPU
    if device_type == "cpu" and not _triton.available("cpu"):
        return ("Triton kernels run on CUDA (on CPU only in Triton's interpreter, "
                "TRITON_INTERPRET=1, for tests)")
    if not _triton.available(device_type):
        return f"no kernels for {device_type} tensors"
    return None


def why_unavailable(name: str, device_type: str) -> str | None:
    """Why backend `name` cannot run `device_type` tensors in this process, or None when it
    can (a fused backend is listed for CUDA only where a GPU is visible)."""
    if name == "extension":
        return None if _extension_serves(device_type) else _extension_unavailable(device_type)
    if name == "triton":
        return _triton_unavailable(device_type)
    return None if name == "reference" else f"unknown backend {name!r}"


_EXTENSION_UNAVAILABLE: dict[str, str | None] = {}


def _extension_serves(device_type: str) -> bool:
    if device_type not in _EXTENSION_UNAVAILABLE:
        _EXTENSION_UNAVAILABLE[device_type] = _extension_unavailable(device_type)
    return _EXTENSION_UNAVAILABLE[device_type] is None


# Constant under torch.compile, like resolve_backend: no graph break.
@assume_constant_result
def dual_apply_served(name: str, device_type: str) -> bool:
    """Whether fused backend `name` has a `bn_dual_apply` kernel for `device_type`: the
    extension where its build registered one for that dispatch key (CPU and CUDA builds
    do), the Triton backend wherever it runs."""
    if name == "extension":
        return _extension_serves(device_type) and _has_kernel("bn_dual_apply", device_type)
    return _serves(name, device_type)


def device_type_of(input: torch.Tensor) -> str:
    """`input.device.type`, without building a torch.device for the two common types (a
    quarter of a microsecond a call)."""
    if input.is_cuda:
        return "cuda"
    return "cpu" if input.is_cpu else input.device.type


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
    return why_unavailable(name, device_type) is None


_warned_fallback = False


def check_backend_name(backend: str) -> None:
    if backend not in _CHOICES:
        raise ValueError(f"unknown backend {backend!r}; choose one of {list(_CHOICES)}")


# torch.compile evaluates this once per (backend, device type) while tracing and keeps the
# answer as a constant, so resolving a backend never breaks the graph.
@assume_constant_result
def resolve_backend(backend: str, device_type: str) -> str:
    """Turn a user's backend choice into a concrete name for a device type, or raise ValueError."""
    # The common cases first, in as few calls as the general path below would answer them
    # (this runs on every call of the functional ops): the extension, named or picked by
    # "auto" for CPU tensors, where it serves them.
    if (backend == "extension" or (backend == "auto" and device_type == "cpu")) \
            and _extension_serves(device_type):
        return "extension"
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
        why = why_unavailable(backend, device_type)
        raise ValueError(
            f"backend {backend!r} is unavailable for {device_type} tensors here"
            f"{f' ({why})' if why else ''}; available: {available_backends(device_type)}"
        )
    return backend


def _warn_fallback(device_type: str) -> None:
    global _warned_fallback
    if _warned_fallback:
        return
    _warned_fallback = True
    if device_type == "cpu" and not _ops.EXTENSION_LOADED:
        return  # `import fused_residual` already warned, with the reason and the fix
    reasons = "; ".join(f"{name}: {why_unavailable(name, device_type) or 'not picked by auto here'}"
                        for name in _preference(device_type))
    warnings.warn(
        f"fused_residual: backend 'auto' falls back to the unfused 'reference' backend for "
        f"{device_type} tensors ({reasons})",
        RuntimeWarning,
        stacklevel=3,
    )
