"""Triton backend of the op layer (docs/op_layer.md).

Importing this package registers eight `torch.library.triton_op`s with the same schemas as
the extension's ops (csrc/ops.cpp):

    torch.ops.fused_residual.triton_bn_stats
    torch.ops.fused_residual.triton_bn_update_running_stats
    torch.ops.fused_residual.triton_bn_apply
    torch.ops.fused_residual.triton_bn_backward_reduce
    torch.ops.fused_residual.triton_bn_backward_apply
    torch.ops.fused_residual.triton_bn_dual_apply
    torch.ops.fused_residual.triton_bn_train_forward   (composite of the launchers)
    torch.ops.fused_residual.triton_bn_backward        (composite of the launchers)

Kernels live in `stats.py`, `apply.py` (bn_apply and bn_dual_apply) and `backward.py`, the
two composites in `composite.py`;
shared geometry and launch heuristics in `_common.py`, jit helpers in `_jit.py`, registration
and launching in `_launch.py`. When Triton cannot be imported nothing is registered and
`TRITON_AVAILABLE` is False. With `TRITON_INTERPRET=1` set before Triton is imported, the
kernels run in Triton's interpreter on CPU tensors (slow; for tests).
"""

from __future__ import annotations

import os

import torch

# Triton decides at decoration time (when the kernel modules below are imported) whether a
# kernel is compiled or interpreted, so the environment is read once, here.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

try:
    import triton
    import triton.language  # noqa: F401
except Exception:  # ImportError, or a broken install (e.g. missing libraries)
    TRITON_AVAILABLE = False
else:
    TRITON_AVAILABLE = True

if TRITON_AVAILABLE:
    from ..decompositions import register_decompositions
    from . import apply, backward, composite, stats  # noqa: F401  (registers the ops)

    register_decompositions()  # their aten twins, for exporters (decompositions.py)

OP_NAMES = (
    "triton_bn_stats",
    "triton_bn_update_running_stats",
    "triton_bn_apply",
    "triton_bn_backward_reduce",
    "triton_bn_backward_apply",
    "triton_bn_dual_apply",
    "triton_bn_train_forward",
    "triton_bn_backward",
)


def available(device_type: str) -> bool:
    """Whether the Triton ops can run on tensors of `device_type` in this process: "cuda"
    with Triton and a CUDA device, "cpu" only under Triton's interpreter."""
    if not TRITON_AVAILABLE:
        return False
    if device_type == "cuda":
        return torch.cuda.is_available()
    if device_type == "cpu":
        return _INTERPRET
    return False


__all__ = ["OP_NAMES", "TRITON_AVAILABLE", "available"]
