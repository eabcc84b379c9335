"""timm adapters for `fused_residual.convert`: the blocks and stems of timm's ResNet family
(`timm.models.resnet`: resnet18/34/50/101/152 and their -d/-c/-s stems, resnext, wide_resnet,
seresnet, ecaresnet, ...).

timm's `BasicBlock` and `Bottleneck` name their activations act1..act3 and carry optional
modules in the way of a fusion: `drop_block` between a BatchNorm and its activation, `se`
(attention) and `drop_path` (stochastic depth) between the last BatchNorm and the add, and
`aa` (anti-aliasing) after an activation. Each part fuses only where it is exactly
relu(norm(·)) (`_blocks`): an SE block or a non-identity DropPath leaves the tail as it is
and still fuses bn1 + act1 and bn2 + act2; `aa` runs after the fused BatchNorm + ReLU. The
stem fuses bn1 + act1, and each BatchNorm + ReLU of a deep stem (conv1 a Sequential).
Shortcuts ending in a BatchNorm, avg-pool ones (resnet50d) included, fuse into the dual op.

This module imports timm; `convert` imports it on first use, when timm is installed.
"""

from __future__ import annotations

import torch.nn as nn
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

from ._blocks import BlockPlan, match_class, plan_block, plan_pairs, sequence_pairs

_BLOCKS = {BasicBlock: "timm BasicBlock", Bottleneck: "timm Bottleneck"}


def plan(module: nn.Module) -> BlockPlan | None:
    """What convert() fuses in `module` if it is a timm ResNet block or stem; else None."""
    layout, reason = match_class(type(module), _BLOCKS)
    if layout is not None:
        return plan_block(module, layout)
    if reason is not None:
        return BlockPlan(f"timm block subclass {type(module).__name__}", note=reason)
    if not isinstance(module, ResNet):
        return None
    if type(module).forward_features is not ResNet.forward_features:
        return BlockPlan("timm ResNet stem", note=f"{type(module).__qualname__} overrides forward_features")
    stem = plan_pairs(module, [("bn1", "act1")], "timm ResNet stem")
    if type(module.conv1) is nn.Sequential:  # the deep stems (-c, -d, -s): conv-bn-act x2, conv
        stem.parts[:0] = plan_pairs(module.conv1, sequence_pairs(module.conv1), "", prefix="conv1.").parts
    return stem
