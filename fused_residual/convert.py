"""`convert(model)`: fuse, in place, every BatchNorm → ReLU, BatchNorm → add → ReLU and
BatchNorm + BatchNorm → add → ReLU that a model computes, whatever its classes;
`convert_report(model)`: what it fuses and why each other BatchNorm is left;
`unconvert(model)`: back to the original classes.

How (the convert layer, bottom up): `_norms` (the norm kinds), `_blocks` (what a converted
model runs), `_programs` (rewritten forwards as data), `_trace` (shallow torch.fx traces),
`_match` (the data-flow matcher), `_rewrite` (plan to model, and back).

Nothing is replaced but classes: a fused norm's `__class__` becomes its fused subclass
(`BatchNormAddReLU2d`, `SyncBatchNormAddReLU2d`, `FrozenBatchNormAddReLU2d`), a module whose
forward holds a pattern becomes a subclass of its class with a rewritten forward, and a ReLU
module that a fused norm now applies becomes a `FoldedReLU`. So attribute names, Parameters,
buffers, state_dict keys, hooks, requires_grad flags, train/eval mode and device/dtype/
memory format carry over, checkpoints load into and out of a converted model unchanged, and
`unconvert` swaps every class back.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch.nn as nn

from . import _norms, _rewrite
from ._programs import base_class
from .backends import check_backend_name


@dataclass
class ModuleReport:
    """One module whose forward calls norms (directly or through a child that ends in one):
    the patterns fused (labels, e.g. "bn2+downsample.1+add+relu") and each norm left, with why."""

    path: str
    cls: str
    fused: list[str] = field(default_factory=list)
    left: list[tuple[str, str]] = field(default_factory=list)  # (norm path from here, reason)

    def line(self) -> str:
        parts = ([f"fused {', '.join(self.fused)}"] if self.fused else []) + \
                ([f"left {'; '.join(f'{n}: {r}' for n, r in self.left)}"] if self.left else [])
        return f"  {self.path or '(model)'} [{self.cls}]: {'; '.join(parts)}"


@dataclass
class ConvertReport:
    """What convert() fuses in a model: per module, the patterns fused and the norms left
    with their reasons; the modules whose forward does not trace (their children are traced
    on their own); the norms no traced forward calls; totals."""

    model: str
    modules: list[ModuleReport]
    untraced: list[tuple[str, str, str]]  # (path, class, first line of the reason)
    other: list[tuple[str, str]]  # (norm path, reason): norms seen in no traced forward
    fused_norms: int  # norms fused (a dual pattern fuses two)
    left: int  # norms left (each BatchNorm of the model is fused or left)

    @property
    def fused(self) -> int:
        """The number of fused patterns (each one fused op in the forward)."""
        return sum(len(m.fused) for m in self.modules)

    def reasons(self) -> list[str]:
        seen = [r for m in self.modules for _, r in m.left] + [r for _, r in self.other]
        return list(dict.fromkeys(seen))

    def __str__(self) -> str:
        lines = [f"fused_residual.convert report for {self.model}:"]
        lines += [m.line() for m in self.modules]
        lines += [f"  not traced: {path or '(model)'} [{cls}]: {why}" for path, cls, why in self.untraced]
        lines += [f"  other norms: {path}: {why}" for path, why in self.other]
        full = sum(bool(m.fused) and not m.left for m in self.modules)
        partly = sum(bool(m.fused) and bool(m.left) for m in self.modules)
        none = len(self.modules) - full - partly
        lines.append(f"totals: {len(self.modules)} modules call norms: {full} fully fused, {partly} partly, "
                     f"{none} not; {self.fused} patterns fused ({self.fused_norms} norms), {self.left} norms "
                     f"left; {len(self.untraced)} modules do not trace")
        return "\n".join(lines)


def _report(model: nn.Module, planner: _rewrite.Planner) -> ConvertReport:
    fused, left, modules, untraced = set(), {}, [], []
    for t in planner.traced:
        if t.graph is None:
            untraced.append((t.path, type(t.module).__name__, t.error))
            continue
        if not t.sites and not t.left:
            continue
        report = ModuleReport(t.path, base_class(type(t.module)).__name__, [s.label for s in t.sites])
        for site in t.sites:
            fused.update(id(s.norm) for s in (site.main, site.other) if s is not None)
        for name, why in t.left:
            norm = t.module.get_submodule(name)
            if id(norm) not in left and id(norm) not in fused:
                left[id(norm)] = why
                report.left.append((name, why))
        modules.append(report)
    modules.sort(key=lambda m: [int(p) if p.isdigit() else p for p in m.path.split(".")] if m.path else [])
    other = _other_norms(model, planner, fused | set(left))
    return ConvertReport(base_class(type(model)).__name__, modules, untraced[::-1], other,
                         sum(s.norms for t in planner.traced for s in t.sites), len(left) + len(other))


def _other_norms(model: nn.Module, planner: _rewrite.Planner, seen: set[int]) -> list[tuple[str, str]]:
    """Each norm no traced forward decides about, with why: its output is what a module
    returns and that module's caller does not trace (or it is the model's output), or it is
    called by a forward that does not trace, or by none."""
    untraced = {id(t.module): t for t in planner.traced if t.graph is None}
    returned = {id(t.ending.norm): t.module for t in planner.traced if t.ending is not None}
    parent = {id(child): m for m in model.modules() for child in m.children()}
    other = []
    for path, m in model.named_modules():
        if not _norms.is_batch_norm(m) or _norms.is_fused(m) or id(m) in seen:
            continue
        reason = "no traced forward calls it"
        if id(m) in returned:
            top = returned[id(m)]
            where = next(p for p, x in model.named_modules() if x is top) or "(model)"
            reason = ("its output is the model's output" if top is model else
                      f"its output is returned by {where}, whose caller does not trace"
                      if id(parent[id(top)]) in untraced else f"its output is returned by {where}, which no "
                      "traced forward calls")
        else:
            ancestor = parent.get(id(m))
            while ancestor is not None and id(ancestor) not in untraced:
                ancestor = parent.get(id(ancestor))
            if ancestor is not None:
                t = untraced[id(ancestor)]
                where = f"{t.path or '(model)'} ({type(t.module).__name__})"
                reason = f"inside {where}, whose forward does not trace ({t.error})"
        other.append((path, reason))
    return other


def _check(model: object, name: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name}() expects an nn.Module, got {type(model).__name__}")


def convert_report(model: nn.Module) -> ConvertReport:
    """What `convert(model)` fuses, per module, and what it leaves and why, without changing
    the model (on a converted model: what is fused). `str()` of it is the text that
    `convert(model, verbose=True)` prints."""
    _check(model, "convert_report")
    saved = _rewrite.snapshot(model)
    try:
        _rewrite.unconvert(model)
        return _report(model, _rewrite.Planner(model, "auto"))
    finally:
        _rewrite.restore(saved)


def convert(model: nn.Module, *, backend: str = "auto", verbose: bool = False) -> nn.Module:
    """Fuse, in place, every exactly equivalent BatchNorm → ReLU, BatchNorm → add → ReLU and
    BatchNorm + BatchNorm → add → ReLU that `model` computes (found by tracing what each
    module computes with torch.fx, whatever its class); returns `model`.

    `backend` ("auto", "extension", "triton" or "reference") is stored on each fused norm
    and call site and resolved per call from the tensors' device, so a converted model may
    move between devices. Converting again re-plans the unconverted model (a norm since
    replaced is fused again), with the given backend. `verbose=True` prints the report
    (`convert_report`); otherwise one RuntimeWarning says so when nothing was fused.
    Raises TypeError for a non-Module, ValueError for an unknown backend.
    """
    _check(model, "convert")
    check_backend_name(backend)
    _rewrite.unconvert(model)
    planner = _rewrite.Planner(model, backend)
    planner.apply()
    report = _report(model, planner)
    if verbose:
        print(report)
    elif report.fused == 0:
        reasons = report.reasons()
        if reasons:
            found = f"{report.left} BatchNorm layers, none fusable ({'; '.join(reasons[:3])})"
        else:
            kinds = sorted({type(m).__name__ for m in model.modules() if "Norm" in type(m).__name__})
            found = f"no BatchNorm layer to fuse (norm layers: {', '.join(kinds) if kinds else 'none'})"
        warnings.warn(f"fused_residual.convert fused nothing in {report.model}: {found}; "
                      f"fused_residual.convert_report(model) lists why", RuntimeWarning, stacklevel=2)
    return model


def unconvert(model: nn.Module) -> nn.Module:
    """Undo `convert` in place; returns `model`. Every class convert() swapped is swapped back
    (fused norms to their plain class, as `nn.SyncBatchNorm` for one synchronized since,
    rewritten modules to their own class, FoldedReLU modules to nn.ReLU) and the attributes it
    added are removed: Parameters, buffers, state_dict, hooks and modes are untouched, and the
    model computes exactly what it did before convert(). Modules built fused (e.g.
    `FusedResidualBlock`, a `BatchNormAddReLU2d` in a model's own code) stay as they are.
    Raises TypeError for a non-Module."""
    _check(model, "unconvert")
    _rewrite.unconvert(model)
    return model
