"""`convert(model)`: fuse the residual tails of a torchvision ResNet in place.

Every torchvision `BasicBlock` and `Bottleneck` in the model (resnet18 to resnet152,
resnext, wide_resnet) gets a fused forward, and each torchvision `ResNet` stem its
bn1 + ReLU fused, without replacing a single Parameter or buffer: the BatchNorms' and the
blocks' `__class__` are swapped to subclasses that only change `forward`
(`BatchNormAddReLU2d`, `fused_residual._torchvision.FusedBasicBlock` / `FusedBottleneck`). So
attribute names, state_dict keys, hooks, requires_grad flags, train/eval mode and
device/dtype/memory format all carry over, and checkpoints load into and out of a
converted model unchanged.

Per block, eager PyTorch runs each BatchNorm, the add and every ReLU as separate memory-bound
passes; a converted block runs one fused op per BatchNorm + ReLU, and one for the tail:
`bn_add_relu` (identity shortcut) or `dual_bn_add_relu` (the downsampling blocks, whose
shortcut BatchNorm is fused into the same pass).
"""

from __future__ import annotations

import warnings

import torch.nn as nn

from .backends import check_backend_name


def convert(model: nn.Module, *, backend: str = "auto") -> nn.Module:
    """Fuse the BatchNorm + add + ReLU tails of every torchvision ResNet block in `model`, and
    the stems' BatchNorm + ReLU, in place; returns `model`.

    `backend` ("auto", "extension", "triton" or "reference") is stored on each fused
    BatchNorm and resolved per call from the tensors' device, so a converted model may move
    between devices. Converting again only changes the backend. Blocks whose norm layers are
    not plain `nn.BatchNorm2d` (FrozenBatchNorm2d, SyncBatchNorm, GroupNorm) are left as they
    are, with a warning. Raises TypeError for a non-Module, ValueError for an unknown backend
    or a model with no torchvision ResNet block or stem, ImportError without torchvision.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert() expects an nn.Module, got {type(model).__name__}")
    check_backend_name(backend)
    try:
        from . import _torchvision
    except ImportError as exc:
        raise ImportError(f"fused_residual.convert needs torchvision: {exc}") from exc

    converted, skipped = 0, []
    for name, module in list(model.named_modules()):
        for convert_one in (_torchvision.convert_block, _torchvision.convert_stem):
            done = convert_one(module, backend)
            if done:
                converted += 1
            elif done is False:
                skipped.append(name or type(module).__name__)
    if skipped:
        warnings.warn(
            f"fused_residual.convert left {len(skipped)} torchvision module(s) unfused (norm layers "
            f"other than nn.BatchNorm2d, or a ResNet subclass with its own forward): "
            f"{', '.join(skipped[:8])}{', ...' if len(skipped) > 8 else ''}",
            RuntimeWarning,
            stacklevel=2,
        )
    if converted == 0:
        raise ValueError(
            f"convert() found no torchvision BasicBlock, Bottleneck or ResNet stem to fuse in "
            f"{type(model).__name__}"
        )
    return model
