"""Fused twins of torchvision's ResNet blocks, used by `fused_residual.convert`.

`FusedBasicBlock` and `FusedBottleneck` subclass torchvision's `BasicBlock` and `Bottleneck`
and only override `forward`: `convert` swaps a block's `__class__`, so its submodules,
Parameters, buffers, hooks and state_dict keys stay the very same objects. In a converted
block every BatchNorm of the main path is a `BatchNormAddReLU2d` (its `__class__` swapped
too), so each conv's BatchNorm + ReLU is one fused op, and the block's tail is

    relu(bn_last(conv_last(out)) + identity)                      one fused op (bn_add_relu)
    relu(bn_last(conv_last(out)) + bn_ds(conv_ds(x)))             one fused op (dual_bn_add_relu)

the second when the shortcut is torchvision's `Sequential(Conv2d, BatchNorm2d)` (the
downsampling blocks). The shortcut's BatchNorm keeps its class and is never called: its
parameters and buffers feed the dual op, with the options its own forward would use. Any
other shortcut (or one with forward hooks, which the dual op would bypass) runs as a module
and its output is the residual.

This module imports torchvision; `convert` imports it on first use, so that
`import fused_residual` does not.
"""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from .functional import dual_bn_add_relu
from .modules import BatchNormAddReLU2d, batch_norm_call_args


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def fusable_shortcut(downsample: nn.Module | None) -> bool:
    """Whether `downsample` is a conv followed by a plain BatchNorm2d, with no forward hooks
    on the Sequential or the BatchNorm (hooks on the conv run: it is called)."""
    return (
        isinstance(downsample, nn.Sequential)
        and len(downsample) == 2
        and isinstance(downsample[0], nn.Conv2d)
        and type(downsample[1]) is nn.BatchNorm2d
        and not _has_hooks(downsample)
        and not _has_hooks(downsample[1])
    )


def fused_tail(block: nn.Module, bn: BatchNormAddReLU2d, out: Tensor, x: Tensor) -> Tensor:
    """relu(bn(out) + shortcut(x)), the shortcut's BatchNorm fused in when it has one."""
    downsample = block.downsample
    if not fusable_shortcut(downsample):
        identity = x if downsample is None else downsample(x)
        return bn(out, identity)
    conv, bn_ds = downsample[0], downsample[1]
    bn._check_input_dim(out)
    x2 = conv(x)
    if x2.dtype != out.dtype:  # as the eager block's in-place add casts the identity
        x2 = x2.to(out.dtype)
    a = batch_norm_call_args(bn)
    a2 = batch_norm_call_args(bn_ds)
    return dual_bn_add_relu(
        out, a.running_mean, a.running_var, a.weight, a.bias,
        x2, a2.running_mean, a2.running_var, a2.weight, a2.bias,
        a.training, a.momentum, a.eps,
        training2=a2.training, momentum2=a2.momentum, eps2=a2.eps, backend=bn.backend,
    )


class FusedBasicBlock(BasicBlock):
    """torchvision's BasicBlock with bn1 + ReLU and bn2 + shortcut + ReLU fused."""

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(self.conv1(x))  # BatchNormAddReLU2d: bn1 + ReLU
        return fused_tail(self, self.bn2, self.conv2(out), x)


class FusedBottleneck(Bottleneck):
    """torchvision's Bottleneck with bn1 + ReLU, bn2 + ReLU and bn3 + shortcut + ReLU fused."""

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(self.conv1(x))
        out = self.bn2(self.conv2(out))
        return fused_tail(self, self.bn3, self.conv3(out), x)


# torchvision block class -> (its fused twin, the names of the BatchNorms made fused).
BLOCKS: dict[type, tuple[type, tuple[str, ...]]] = {
    BasicBlock: (FusedBasicBlock, ("bn1", "bn2")),
    Bottleneck: (FusedBottleneck, ("bn1", "bn2", "bn3")),
    FusedBasicBlock: (FusedBasicBlock, ("bn1", "bn2")),
    FusedBottleneck: (FusedBottleneck, ("bn1", "bn2", "bn3")),
}


def _fusable_bn(bn: object) -> bool:
    return type(bn) in (nn.BatchNorm2d, BatchNormAddReLU2d)


def _make_fused_bn(bn: nn.BatchNorm2d, backend: str) -> None:
    bn.__class__ = BatchNormAddReLU2d
    bn.backend = backend


def convert_block(block: nn.Module, backend: str) -> bool | None:
    """Fuse one torchvision block in place. True: converted (or re-converted with this
    backend); False: a torchvision block that cannot be (a norm layer other than
    BatchNorm2d, e.g. FrozenBatchNorm2d or SyncBatchNorm); None: not a torchvision block."""
    entry = BLOCKS.get(type(block))
    if entry is None:
        return None
    fused_cls, bn_names = entry
    bns = [getattr(block, name, None) for name in bn_names]
    if not all(_fusable_bn(bn) for bn in bns):
        return False
    for bn in bns:
        _make_fused_bn(bn, backend)
    block.__class__ = fused_cls
    return True


def convert_stem(model: nn.Module, backend: str) -> bool | None:
    """Fuse a torchvision ResNet's stem bn1 + ReLU in place: bn1 becomes a BatchNormAddReLU2d
    and `relu` an nn.Identity, which keeps ResNet's own forward. Same return values as
    `convert_block`; a ResNet subclass with its own forward is left alone (False)."""
    if not isinstance(model, ResNet):
        return None
    cls = type(model)
    if cls.forward is not ResNet.forward or cls._forward_impl is not ResNet._forward_impl:
        return False
    if type(model.bn1) is BatchNormAddReLU2d and isinstance(model.relu, nn.Identity):
        model.bn1.backend = backend  # already converted
        return True
    if type(model.bn1) is not nn.BatchNorm2d or not isinstance(model.relu, nn.ReLU):
        return False
    _make_fused_bn(model.bn1, backend)
    model.relu = nn.Identity()
    return True
