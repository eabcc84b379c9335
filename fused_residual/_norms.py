"""The norm layers `convert` fuses, one `NormKind` each, listed in `norm_kinds()`: the one
place a new kind is added. The bottom of the convert layer: it imports the modules layer
(`modules`, `distributed.modules`, `_torchvision`) and nothing of the convert layer.

A kind pairs the class models are built with (`plain`: nn.BatchNorm2d, nn.SyncBatchNorm,
torchvision's FrozenBatchNorm2d) with its fused subclass (`fused`: a `modules.FusedNorm` that
only adds `forward(input, residual=None)`), and says how to read a module of either class into a
`NormState` (what a dual op reads from the second norm, which keeps its plain class) and
whether its statistics are synchronized across processes (over the module's
`process_group`). Only exact classes match: a subclass may have its own forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from .distributed.modules import SyncBatchNormAddReLU2d
from .modules import BatchNormAddReLU2d, FusedNorm, NormState, batch_norm_state


@dataclass(frozen=True)
class NormKind:
    plain: type[nn.Module]
    fused: type[nn.Module]
    state: Callable[[nn.Module], NormState]
    synchronized: bool = False  # batch statistics over the module's process_group


_KINDS: list[NormKind] = []
_BY_CLASS: dict[type, NormKind] = {}  # plain and fused class -> kind (one lookup per call)
_FROZEN: list[type] = []  # torchvision's FrozenBatchNorm2d, when torchvision is installed


def norm_kinds() -> tuple[NormKind, ...]:
    """Every kind, built on first use (a plain list, not functools.cache: the fused forward
    reads it and torch.compile traces it)."""
    if not _KINDS:
        kinds = [NormKind(nn.BatchNorm2d, BatchNormAddReLU2d, batch_norm_state),
                 NormKind(nn.SyncBatchNorm, SyncBatchNormAddReLU2d, batch_norm_state, synchronized=True)]
        try:
            from ._torchvision import FrozenBatchNorm2d, FrozenBatchNormAddReLU2d, frozen_batch_norm_state
        except ImportError:  # no torchvision: no FrozenBatchNorm2d either
            pass
        else:
            kinds.append(NormKind(FrozenBatchNorm2d, FrozenBatchNormAddReLU2d, frozen_batch_norm_state))
            _FROZEN.append(FrozenBatchNorm2d)
        _KINDS.extend(kinds)
        _BY_CLASS.update({cls: kind for kind in kinds for cls in (kind.plain, kind.fused)})
    return tuple(_KINDS)


def kind_of(module: object) -> NormKind | None:
    """The kind of a norm of a kind convert() fuses, plain or fused; None otherwise."""
    if not _BY_CLASS:
        norm_kinds()
    return _BY_CLASS.get(type(module))


def plain_kind(module: object) -> NormKind | None:
    """The kind of a plain norm (its exact class is the kind's plain class)."""
    kind = kind_of(module)
    return kind if kind is not None and type(module) is kind.plain else None


def is_fused(module: object) -> bool:
    return isinstance(module, FusedNorm)


def is_batch_norm(module: object) -> bool:
    """Any BatchNorm (1d/2d/3d, synchronized, frozen, fused or a subclass): what the report
    accounts for, fused or left with a reason."""
    norm_kinds()
    return isinstance(module, _BatchNorm) or (bool(_FROZEN) and isinstance(module, _FROZEN[0]))


def has_hooks(module: nn.Module) -> bool:
    """Module hooks that a fused op would bypass or feed a different value."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def names() -> str:
    return ", ".join(k.plain.__name__ for k in norm_kinds())


def norm_state(module: nn.Module) -> NormState:
    kind = kind_of(module)
    assert kind is not None, type(module)
    return kind.state(module)


def fuse(module: nn.Module, backend: str) -> None:
    """Swap `module`'s class to its kind's fused class (in place: the same Parameters and
    buffers); converting again only sets the backend."""
    kind = kind_of(module)
    assert kind is not None, type(module)
    module.__class__ = kind.fused
    module.backend = backend


def unfuse(module: nn.Module) -> None:
    """Undo `fuse`: the kind's plain class, without the `backend` attribute."""
    kind = kind_of(module)
    if kind is not None and type(module) is kind.fused:
        module.__class__ = kind.plain
        module.__dict__.pop("backend", None)


def dual_compatible(norm: nn.Module, norm2: nn.Module) -> bool:
    """Whether one dual op can normalize with both norms (each of a known kind): neither is
    synchronized, or both are, over the same `process_group` object (or both None, the WORLD
    group) and in the same train/eval mode; otherwise the second norm runs as a module."""
    kind, kind2 = kind_of(norm), kind_of(norm2)
    if not (kind.synchronized or kind2.synchronized):
        return True
    return (kind.synchronized and kind2.synchronized and norm.process_group is norm2.process_group
            and norm.training == norm2.training)
