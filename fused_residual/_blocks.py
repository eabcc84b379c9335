"""Fused residual blocks, described by a `Layout` of attribute names, shared by the torchvision
and timm adapters (`_torchvision.py`, `_timm.py`) and by models that copy their blocks.

A block's main path is a few stages `conv → norm → (between…) → act → (after…)` and a tail
`conv → norm → (between…) → + shortcut(x) → act`. `convert` fuses each part that is exactly
`relu(norm(·))` (every module between the norm and the activation absent or nn.Identity,
the activation an nn.ReLU, no hooks in the way) by swapping the norm's class to its fused
subclass, and swaps the block's class to a subclass whose forward is `fused_block_forward`:
the same computation, in which a fused norm also applies the ReLU (and, at the tail, the
add). What runs fused is read from the norms' classes, so a part left unfused (an SE
module or a DropPath before the add, a SiLU) runs exactly as before. The block also records
which norms convert() fused: one since replaced by a plain norm of a kind convert() fuses
(`nn.SyncBatchNorm.convert_sync_batchnorm` after convert() builds new nn.SyncBatchNorm
modules) still runs fused. A stem keeps its container's forward; its ReLU becomes a
`FoldedReLU`, which applies the ReLU itself if its norm loses its fused class.

A fused tail whose shortcut ends in a plain norm (torchvision's Sequential(conv, BatchNorm),
timm's avg-pool variant) runs the shortcut's other modules and then one
`dual_bn_add_relu`, which normalizes both branches, adds and applies the ReLU in one pass;
the shortcut norm keeps its class and is read, never called. Synchronized norms
(nn.SyncBatchNorm) use `sync_dual_bn_add_relu` when both share a process group; when only
one is synchronized, or their groups differ, the shortcut runs as modules and feeds the
single fused tail.

Fused block classes are made per original class (`fused_block_class`), so a converted block
is still an instance of its class (a user's subclass too). They live in this module under an
encoded name that `__getattr__` decodes, so `torch.save` of a whole converted model loads in
a fresh process.
"""

from __future__ import annotations

import dis
import functools
import importlib
import itertools
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import _norms
from .distributed.functional import sync_dual_bn_add_relu
from .functional import dual_bn_add_relu
from .modules import NormState, check_4d, norm_call_args


@dataclass(frozen=True)
class Stage:
    conv: str
    norm: str
    act: str
    between: tuple[str, ...] = ()  # modules between norm and act (tail: between norm and add)
    after: tuple[str, ...] = ()  # modules after act (timm's anti-aliasing `aa`)


@dataclass(frozen=True)
class Layout:
    name: str  # "torchvision Bottleneck"
    stages: tuple[Stage, ...]
    tail: Stage
    shortcut: str = "downsample"


_TV_RELU = dict(act="relu")
LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (
    Layout("torchvision BasicBlock", (Stage("conv1", "bn1", **_TV_RELU),), Stage("conv2", "bn2", **_TV_RELU)),
    Layout("torchvision Bottleneck", (Stage("conv1", "bn1", **_TV_RELU), Stage("conv2", "bn2", **_TV_RELU)),
           Stage("conv3", "bn3", **_TV_RELU)),
    Layout("timm BasicBlock", (Stage("conv1", "bn1", "act1", ("drop_block",), ("aa",)),),
           Stage("conv2", "bn2", "act2", ("se", "drop_path"))),
    Layout("timm Bottleneck",
           (Stage("conv1", "bn1", "act1"), Stage("conv2", "bn2", "act2", ("drop_block",), ("aa",))),
           Stage("conv3", "bn3", "act3", ("se", "drop_path"))),
)}


# --------------------------------------------------------------------------------------------
# The fused forward
# --------------------------------------------------------------------------------------------


@torch.fx.wrap
def fused_dual_forward(input: Tensor, input2: Tensor, state: NormState, state2: NormState, backend: str,
                       synchronized: bool = False, process_group: dist.ProcessGroup | None = None) -> Tensor:
    """relu(norm(input) + norm2(input2)) in one fused op (torch.fx records one call). With
    `synchronized` (both norms synchronized over `process_group`, in the same mode) and in
    training, both norms' statistics are synchronized (`sync_dual_bn_add_relu`); as
    nn.SyncBatchNorm, eval mode never synchronizes."""
    check_4d(input)
    if input2.dtype != input.dtype:  # as the eager block's in-place add casts the shortcut
        input2 = input2.to(input.dtype)
    a, a2 = norm_call_args(state), norm_call_args(state2)
    args = (input, a.running_mean, a.running_var, a.weight, a.bias,
            input2, a2.running_mean, a2.running_var, a2.weight, a2.bias, a.training, a.momentum, a.eps)
    options = dict(training2=a2.training, momentum2=a2.momentum, eps2=a2.eps, backend=backend)
    if synchronized and state.training:
        return sync_dual_bn_add_relu(*args, **options, process_group=process_group)
    return dual_bn_add_relu(*args, **options)


def dual_shortcut_norm(shortcut: nn.Module | None, norm: nn.Module) -> nn.Module | None:
    """The shortcut's last module when the dual op can take it in with the tail's `norm`: an
    nn.Sequential of two or more modules ending in a plain norm of a kind convert() fuses, no
    hooks on either, and synchronized as `norm` is (`_norms.dual_compatible`)."""
    if type(shortcut) is not nn.Sequential or len(shortcut) < 2 or _norms.has_hooks(shortcut):
        return None
    norm2 = shortcut[-1]
    kind = _norms.kind_of(norm2)
    if kind is None or type(norm2) is not kind.plain or _norms.has_hooks(norm2):
        return None
    return norm2 if _norms.dual_compatible(norm, norm2) else None


class FoldedReLU(nn.Identity):
    """What a stem's ReLU becomes when convert() folds it into the norm before it (the
    container's attribute `norm`), whose fused forward applies it: the stem's own forward
    still calls it, and it returns its input.

    Should that norm lose its fused class (`nn.SyncBatchNorm.convert_sync_batchnorm` after
    convert() puts a new, plain nn.SyncBatchNorm in its place), it applies the ReLU itself, so
    the ReLU is never dropped; `convert` fuses such a pair again. The container is held as a
    plain attribute, not a submodule (no state_dict entry, no cycle in `modules()`); deepcopy
    and pickle point it at the copy's container."""

    def __init__(self, container: nn.Module, norm: str) -> None:
        super().__init__()
        self.norm = norm
        self.__dict__["_container"] = container  # bypasses nn.Module.__setattr__: not a child

    def folds(self, container: nn.Module, norm: str) -> bool:
        return self.__dict__.get("_container") is container and self.norm == norm

    def forward(self, input: Tensor) -> Tensor:
        if _norms.is_fused(getattr(self._container, self.norm)):
            return input
        return F.relu(input)

    def extra_repr(self) -> str:
        return f"norm={self.norm!r}"


def folded_pair(norm: object, act: object) -> bool:
    """Whether (norm, act) is a stem pair that convert() fused: act is a FoldedReLU (or, in a
    model converted before FoldedReLU existed, an nn.Identity after a fused norm)."""
    return isinstance(act, FoldedReLU) or (_norms.is_fused(norm) and type(act) is nn.Identity)


def _run(block: nn.Module, names: tuple[str, ...], x: Tensor) -> Tensor:
    for name in names:
        module = getattr(block, name)
        if module is not None:
            x = module(x)
    return x


def _fused_backend(block: nn.Module, norm: nn.Module, name: str) -> str | None:
    """The backend the block's norm `name` runs fused with; None: that part runs unfused, as
    the original block. A fused norm: its own backend. A plain norm of a kind convert() fuses,
    without hooks, where convert() fused one (nn.SyncBatchNorm.convert_sync_batchnorm after
    convert() puts new plain nn.SyncBatchNorm modules there, sharing the Parameters and
    buffers): the backend convert() used, so the block stays fused."""
    if _norms.is_fused(norm):
        return norm.backend
    recorded = block._fused_norms
    if not recorded or name not in recorded or _norms.kind_of(norm) is None or _norms.has_hooks(norm):
        return None
    return recorded[name]


def _norm_add_relu(norm: nn.Module, input: Tensor, residual: Tensor | None, backend: str) -> Tensor:
    """relu(norm(input) + residual), fused: a fused norm's own call (its hooks fire), or its
    kind's fused op run on a plain norm's state (see `_fused_backend`)."""
    if _norms.is_fused(norm):
        return norm(input) if residual is None else norm(input, residual)
    return _norms.kind_of(norm).fused.run(norm, input, residual, backend)


def _run_tail(block: nn.Module, tail: Stage, out: Tensor, x: Tensor, shortcut_name: str) -> Tensor:
    norm, shortcut = getattr(block, tail.norm), getattr(block, shortcut_name)
    backend = _fused_backend(block, norm, tail.norm)
    if backend is None:
        out = _run(block, tail.between, norm(out))
        out += x if shortcut is None else shortcut(x)
        return getattr(block, tail.act)(out)
    # A hook on the tail's norm (registered after convert) must fire: the dual op calls no norm.
    norm2 = None if _norms.has_hooks(norm) else dual_shortcut_norm(shortcut, norm)
    if norm2 is None:
        return _norm_add_relu(norm, out, x if shortcut is None else shortcut(x), backend)
    for module in list(shortcut)[:-1]:
        x = module(x)
    kind = _norms.kind_of(norm)
    return fused_dual_forward(out, x, kind.state(norm), _norms.norm_state(norm2), backend,
                              kind.synchronized, norm.process_group if kind.synchronized else None)


def fused_block_forward(self: nn.Module, x: Tensor) -> Tensor:
    """The block's own computation, each part fused where its norm is (see module doc)."""
    layout: Layout = self._fused_layout
    out = x
    for stage in layout.stages:
        norm = getattr(self, stage.norm)
        out = getattr(self, stage.conv)(out)
        backend = _fused_backend(self, norm, stage.norm)
        if backend is None:
            out = getattr(self, stage.act)(_run(self, stage.between, norm(out)))
        else:
            out = _norm_add_relu(norm, out, None, backend)
        out = _run(self, stage.after, out)
    return _run_tail(self, layout.tail, getattr(self, layout.tail.conv)(out), x, layout.shortcut)


# --------------------------------------------------------------------------------------------
# Fused classes, picklable by name
# --------------------------------------------------------------------------------------------

_PREFIX = "Fused_"


def _encoded_name(base: type, layout: Layout) -> str:
    key = f"{base.__module__}:{base.__qualname__}:{layout.name}"
    return f"{_PREFIX}{base.__name__}_{key.encode().hex()}"


@functools.cache
def fused_block_class(base: type, layout_name: str) -> type:
    """The subclass of `base` with the fused forward of layout `layout_name`."""
    if getattr(base, "_fused_layout", None) is not None:
        return base
    layout = LAYOUTS[layout_name]
    return type(f"Fused{base.__name__}", (base,), {
        "forward": fused_block_forward,
        "_fused_layout": layout,
        "_fused_norms": None,  # per block, set by convert(): {norm attribute: backend} it fused
        "__module__": __name__,
        "__qualname__": _encoded_name(base, layout),
        "__doc__": f"{base.__qualname__} with its BatchNorm + ReLU parts fused by fused_residual.convert "
                   f"({layout.name} layout).",
    })


def __getattr__(name: str) -> type:
    """Resolve a fused class's encoded name (what pickle stores) back to the class."""
    if name.startswith(_PREFIX):
        try:
            module, qualname, layout_name = bytes.fromhex(name.rsplit("_", 1)[1]).decode().split(":")
        except ValueError:
            pass
        else:
            base = importlib.import_module(module)
            for part in qualname.split("."):
                base = getattr(base, part)
            return fused_block_class(base, layout_name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _instructions(code) -> tuple[tuple, ...]:
    # Opcodes with what they refer to: constants and names by value, local variables by slot
    # (so names of locals, comments, line numbers and the docstring do not matter).
    return tuple((ins.opname, ins.arg if ins.opcode in dis.haslocal else ins.argval)
                 for ins in dis.get_instructions(code))


def same_code(f: object, g: object) -> bool:
    """Whether two functions compile to the same code (a copy of a forward, whatever its
    variable names, comments and docstring): the same instructions on the same constants,
    attribute and global names, and the same arguments."""
    fc, gc = getattr(f, "__code__", None), getattr(g, "__code__", None)
    if fc is None or gc is None:
        return False
    return (fc.co_names == gc.co_names and fc.co_argcount == gc.co_argcount
            and fc.co_kwonlyargcount == gc.co_kwonlyargcount and fc.co_freevars == gc.co_freevars
            and _instructions(fc) == _instructions(gc))


def match_class(cls: type, references: dict[type, str], methods: tuple[str, ...] = ("forward",)
                ) -> tuple[str | None, str | None]:
    """(layout name, None) when `cls` computes what a reference class does: the reference, a
    subclass that keeps its `methods`, a fused class, or a copy whose `methods` compile to the
    same code; (None, reason) for a subclass with its own methods; (None, None) otherwise."""
    fused = getattr(cls, "_fused_layout", None)
    if fused is not None:
        return (fused.name, None) if fused.name in references.values() else (None, None)
    for ref, name in references.items():
        if issubclass(cls, ref):
            own = [m for m in methods if getattr(cls, m) is not getattr(ref, m)]
            if own:
                return None, f"{cls.__qualname__} overrides {', '.join(own)}"
            return name, None
    for ref, name in references.items():
        if all(same_code(getattr(cls, m, None), getattr(ref, m)) for m in methods):
            return name, None
    return None, None


# --------------------------------------------------------------------------------------------
# Plans: what convert() fuses in a block, and why the rest is left
# --------------------------------------------------------------------------------------------


@dataclass
class Part:
    """One fusable unit: a norm + ReLU, or a tail norm + add + ReLU."""

    label: str  # "bn1+relu", "bn3+downsample.1+add+relu", "bn3 → se → add"
    reason: str | None = None  # why it is left as it is; None: it fuses
    norms: tuple[nn.Module, ...] = ()  # made fused
    names: tuple[str, ...] = ()  # the block's attribute names of `norms` (a block's parts)
    fold: tuple[nn.Module, str, str] | None = None  # a stem's (container, act, norm): act -> FoldedReLU

    @property
    def fuses(self) -> bool:
        return self.reason is None


@dataclass
class BlockPlan:
    kind: str  # "torchvision Bottleneck", "timm ResNet stem"
    parts: list[Part] = field(default_factory=list)
    block: nn.Module | None = None  # the block whose class is swapped when a part fuses
    fused_class: type | None = None
    note: str | None = None  # why nothing in it can fuse (e.g. it overrides forward)

    def apply(self, backend: str) -> None:
        fused = [p for p in self.parts if p.fuses]
        for part in fused:
            for norm in part.norms:
                _norms.fuse(norm, backend)
            if part.fold is not None:
                container, act, norm = part.fold
                folded = getattr(container, act)
                if not (isinstance(folded, FoldedReLU) and folded.folds(container, norm)):
                    setattr(container, act, FoldedReLU(container, norm))
        if fused and self.fused_class is not None:
            self.block.__class__ = self.fused_class
            self.block._fused_norms = {name: backend for part in fused for name in part.names}


_DESCRIBE = {"se": "SE module", "drop_path": "DropPath (stochastic depth)", "drop_block": "DropBlock",
             "aa": "anti-aliasing layer"}


def _absent(module: object) -> bool:
    return module is None or (type(module) is nn.Identity and not _norms.has_hooks(module))


def _in_the_way(block: nn.Module, names: tuple[str, ...], where: str) -> str | None:
    for name in names:
        m = getattr(block, name, None)
        if not _absent(m):
            what = _DESCRIBE.get(name, name)
            return f"{what} ({type(m).__name__}) between BatchNorm and {where}"
    return None


def pair_reason(norm: object, norm_name: str, act: object, act_name: str) -> str | None:
    """Why `act(norm(x))` is not relu(norm(x)) convert() can fuse; None when it is."""
    reason = _norms.why_not_fusable(norm, norm_name)
    if reason is None and (act is None or type(act) is not nn.ReLU):
        reason = f"activation {act_name} is {type(act).__name__}, not ReLU"
    if reason is None and _norms.has_hooks(act):
        reason = f"{act_name} has module hooks"
    return reason


def _stage_part(block: nn.Module, stage: Stage, tail: bool) -> Part:
    norm, act = getattr(block, stage.norm, None), getattr(block, stage.act, None)
    reason = (pair_reason(norm, stage.norm, act, stage.act)
              or _in_the_way(block, stage.between, "add" if tail else "activation"))
    if reason is not None:
        names = [stage.norm, *(n for n in stage.between if not _absent(getattr(block, n, None)))]
        end = "add" if tail else stage.act
        return Part(" → ".join([*names, end]), reason)
    return Part(f"{stage.norm}+{'add+' if tail else ''}{stage.act}", norms=(norm,), names=(stage.norm,))


def plan_block(block: nn.Module, layout_name: str) -> BlockPlan:
    layout = LAYOUTS[layout_name]
    plan = BlockPlan(layout.name, block=block, fused_class=fused_block_class(type(block), layout_name))
    plan.parts = [_stage_part(block, stage, tail=False) for stage in layout.stages]
    tail = _stage_part(block, layout.tail, tail=True)
    if tail.fuses:
        shortcut = getattr(block, layout.shortcut, None)
        if dual_shortcut_norm(shortcut, getattr(block, layout.tail.norm)) is not None:
            tail.label = tail.label.replace("+add", f"+{layout.shortcut}.{len(shortcut) - 1}+add")
    plan.parts.append(tail)
    return plan


def plan_pairs(container: nn.Module, pairs: list[tuple[str, str]], kind: str, prefix: str = "") -> BlockPlan:
    """A stem: each (norm, act) attribute pair of `container` that its forward runs in a row
    fuses by making the norm fused and the act a `FoldedReLU` (the container's forward is
    kept). Pairs convert() made (`folded_pair`) plan as fused again, so convert() fuses a norm
    that lost its fused class again. `prefix` (the container's path from the block the report
    names) goes before the labels."""
    plan = BlockPlan(kind)
    for norm_name, act_name in pairs:
        norm, act = getattr(container, norm_name), getattr(container, act_name)
        if folded_pair(norm, act):
            reason = _norms.why_not_fusable(norm, norm_name)
        else:
            reason = pair_reason(norm, norm_name, act, act_name)
        n, a = prefix + norm_name, prefix + act_name
        label = f"{n}+{a}" if reason is None else f"{n} → {a}"
        plan.parts.append(Part(label, reason, norms=(norm,), fold=(container, act_name, norm_name)))
    return plan


def sequence_pairs(container: nn.Module, skip: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
    """Consecutive (norm, ReLU) children of a container whose forward runs its children in
    order (nn.Sequential, torchvision's IntermediateLayerGetter); also the pairs convert()
    made (`folded_pair`). Norms named in `skip` (outputs the container returns) stay."""
    names = list(container._modules)
    pairs = []
    for a, b in itertools.pairwise(names):
        norm, act = container._modules[a], container._modules[b]
        if a in skip or _norms.kind_of(norm) is None:
            continue
        if type(act) is nn.ReLU or folded_pair(norm, act):
            pairs.append((a, b))
    return pairs
