"""`convert(model)`: fuse the BatchNorm + ReLU and BatchNorm + add + ReLU parts of the ResNet
blocks and stems in a model, in place; `convert_report(model)`: what it fuses and why the
rest is left.

Recognized (adapters: `_torchvision.py`, `_timm.py`, the shared layouts in `_blocks.py`):
torchvision's `BasicBlock` / `Bottleneck` and `ResNet` stem, the body of a torchvision
detection backbone (`IntermediateLayerGetter`), timm's ResNet-family blocks and stems, and
subclasses or copies of these blocks that compute what they compute. Norms: nn.BatchNorm2d
and torchvision's FrozenBatchNorm2d (`_norms.py`, where a new kind is added).

Nothing is replaced but classes: a fused norm's `__class__` becomes its fused subclass
(`BatchNormAddReLU2d`, `FrozenBatchNormAddReLU2d`), a block's its fused subclass, and a stem
ReLU that the fused norm now applies becomes nn.Identity. So attribute names, Parameters,
buffers, state_dict keys, hooks, requires_grad flags, train/eval mode and device/dtype/
memory format carry over, and checkpoints load into and out of a converted model unchanged.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass

import torch.nn as nn

from . import _norms
from ._blocks import BlockPlan
from .backends import check_backend_name


def _planners() -> list:
    planners = []
    try:
        from . import _torchvision
    except ImportError:
        pass
    else:
        planners.append(_torchvision.plan)
    # A model holding timm modules has imported timm: don't import it (seconds) otherwise.
    if "timm" in sys.modules:
        try:
            from . import _timm
        except ImportError:  # a timm without timm.models.resnet's blocks
            pass
        else:
            planners.append(_timm.plan)
    return planners


@dataclass
class ConvertReport:
    """Per recognized block or stem (by module path): the parts fused, the parts left and
    why; and the norm layers outside any recognized block, which convert() leaves alone."""

    model: str
    blocks: list[tuple[str, BlockPlan]]
    other_norms: list[str]

    @property
    def fused(self) -> int:
        """The number of fused parts (each one fused op in the forward)."""
        return sum(p.fuses for _, b in self.blocks for p in b.parts)

    @property
    def left(self) -> int:
        return sum(not p.fuses for _, b in self.blocks for p in b.parts)

    def __str__(self) -> str:
        lines = [f"fused_residual.convert report for {self.model}:"]
        full = partial = none = 0
        for name, block in self.blocks:
            done = [p.label for p in block.parts if p.fuses]
            left = [f"{p.label}: {p.reason}" for p in block.parts if not p.fuses]
            if block.note:
                left.append(block.note)
            full += bool(done) and not left
            partial += bool(done) and bool(left)
            none += not done
            text = "; ".join(([f"fused {', '.join(done)}"] if done else [])
                             + ([f"left {'; '.join(left)}"] if left else []))
            lines.append(f"  {name or '(model)'} [{block.kind}]: {text}")
        lines.append(
            f"totals: {len(self.blocks)} blocks/stems: {full} fully fused, {partial} partly, {none} not; "
            f"{self.fused} parts fused, {self.left} left; {len(self.other_norms)} norm layers outside "
            f"them left as they are"
            + (f" ({', '.join(self.other_norms[:6])}{', ...' if len(self.other_norms) > 6 else ''})"
               if self.other_norms else ""))
        return "\n".join(lines)


def _plan(model: nn.Module) -> ConvertReport:
    planners = _planners()
    blocks, covered = [], set()
    for name, module in model.named_modules():
        for plan in planners:
            block = plan(module)
            if block is not None:
                blocks.append((name, block))
                # A block's norms are all its own (fused, read or left); a stem's, its pairs'.
                inside = block.block.modules() if block.block is not None else ()
                covered.update(id(m) for m in inside)
                covered.update(id(m) for part in block.parts for m in part.norms)
                break
    other = [name for name, m in model.named_modules()
             if _norms.kind_of(m) is not None and id(m) not in covered]
    return ConvertReport(type(model).__name__, blocks, other)


def convert_report(model: nn.Module) -> ConvertReport:
    """What `convert(model)` fuses, per block and stem, and what it leaves and why, without
    changing the model (on a converted model: what is fused). `str()` of it is the text that
    `convert(model, verbose=True)` prints."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert_report() expects an nn.Module, got {type(model).__name__}")
    return _plan(model)


def convert(model: nn.Module, *, backend: str = "auto", verbose: bool = False) -> nn.Module:
    """Fuse, in place, every exactly equivalent BatchNorm + ReLU and BatchNorm + add + ReLU of
    the torchvision and timm ResNet blocks and stems in `model` (and of copies of their
    blocks); returns `model`.

    `backend` ("auto", "extension", "triton" or "reference") is stored on each fused norm
    and resolved per call from the tensors' device, so a converted model may move between
    devices. Converting again only changes the backend. `verbose=True` prints the report
    (`convert_report`): per block, what was fused, what was left and why, and the totals.
    Otherwise a single RuntimeWarning says so when nothing was fused. Raises TypeError for a
    non-Module, ValueError for an unknown backend.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert() expects an nn.Module, got {type(model).__name__}")
    check_backend_name(backend)
    report = _plan(model)
    for _, block in report.blocks:
        block.apply(backend)
    if verbose:
        print(report)
    elif report.fused == 0:
        reasons = sorted({p.reason for _, b in report.blocks for p in b.parts if p.reason}
                         | {b.note for _, b in report.blocks if b.note})
        found = (f"{len(report.blocks)} blocks/stems found, none fusable ({'; '.join(reasons[:3])})"
                 if report.blocks else "no torchvision or timm ResNet block or stem found")
        warnings.warn(
            f"fused_residual.convert fused nothing in {report.model}: {found}; "
            f"fused_residual.convert_report(model) lists why",
            RuntimeWarning,
            stacklevel=2,
        )
    return model
