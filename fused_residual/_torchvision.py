"""torchvision adapters for `fused_residual.convert`: ResNet blocks, stems, detection bodies and
FrozenBatchNorm2d.

- `BasicBlock` / `Bottleneck` (resnet18 to resnet152, resnext, wide_resnet; their
  subclasses that keep torchvision's forward; classes outside torchvision whose forward is a
  copy of it): every BatchNorm + ReLU and the tail fuse (`_blocks`).
- The `ResNet` stem (bn1 + relu) and the stem of a detection backbone's body (torchvision's
  `IntermediateLayerGetter` over a ResNet, as `resnet_fpn_backbone` builds it): the norm
  fuses and the ReLU becomes nn.Identity, keeping the container's own forward.
- `FrozenBatchNorm2d` (detection and segmentation backbones; its four buffers and eps) is a
  norm kind: its fused twin is the eval-mode fused op, differentiable with respect to the
  input and the residual only (weight and bias are buffers).

This module imports torchvision; `convert` imports it on first use, so that
`import fused_residual` does not.
"""

from __future__ import annotations

import torch.nn as nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.ops.misc import FrozenBatchNorm2d

from ._blocks import BlockPlan, fused_block_class, match_class, plan_block, plan_pairs, sequence_pairs
from ._norms import NormKind
from .backends import check_backend_name
from .modules import FusedNorm, NormState

_BLOCKS = {BasicBlock: "torchvision BasicBlock", Bottleneck: "torchvision Bottleneck"}

# The fused twins of torchvision's own blocks, by their historical names.
FusedBasicBlock = fused_block_class(BasicBlock, "torchvision BasicBlock")
FusedBottleneck = fused_block_class(Bottleneck, "torchvision Bottleneck")


def frozen_batch_norm_state(bn: FrozenBatchNorm2d) -> NormState:
    """FrozenBatchNorm2d is always an eval-mode BatchNorm of its buffers."""
    return NormState(bn.weight, bn.bias, bn.running_mean, bn.running_var, None, False, True, 0.0, bn.eps)


class FrozenBatchNormAddReLU2d(FusedNorm, FrozenBatchNorm2d):
    """torchvision's FrozenBatchNorm2d with `forward(input, residual=None)` =
    relu(frozen_bn(input) + residual) in one fused op (same buffers and state_dict keys)."""

    def __init__(self, num_features: int, eps: float = 1e-5, *, backend: str = "auto") -> None:
        super().__init__(num_features, eps)
        check_backend_name(backend)
        self.backend = backend

    def norm_state(self) -> NormState:
        return frozen_batch_norm_state(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.weight.shape[0]}, eps={self.eps}, backend={self.backend!r})"


FROZEN_BATCH_NORM = NormKind(FrozenBatchNorm2d, FrozenBatchNormAddReLU2d, frozen_batch_norm_state)


def plan(module: nn.Module) -> BlockPlan | None:
    """What convert() fuses in `module` if it is a torchvision block or stem; else None."""
    cls = type(module)
    layout, reason = match_class(cls, _BLOCKS)
    if layout is not None:
        return plan_block(module, layout)
    if reason is not None:
        return BlockPlan(f"torchvision block subclass {cls.__name__}", note=reason)
    stem, reason = match_class(cls, {ResNet: "torchvision ResNet"}, ("forward", "_forward_impl"))
    if stem is not None:
        return plan_pairs(module, [("bn1", "relu")], "torchvision ResNet stem")
    if reason is not None:
        return BlockPlan("torchvision ResNet stem", note=reason)
    if type(module) is IntermediateLayerGetter:
        pairs = sequence_pairs(module, skip=frozenset(module.return_layers))
        if pairs:
            return plan_pairs(module, pairs, "torchvision IntermediateLayerGetter stem")
    return None
