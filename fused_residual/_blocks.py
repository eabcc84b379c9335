"""What a converted model runs in place of the patterns convert() fused: the call sites of a
rewritten forward (`Site`, `BranchCall`), `FoldedReLU`, and `fused_dual_forward`.

A rewritten forward (`_programs`) is the module's own traced computation in which each fused
pattern (norm → ReLU, norm → add → ReLU, norm + norm → add → ReLU) is one call of a `Site`.
A site decides at each call what runs, so that the converted model computes exactly what the
original did whatever has changed since convert():

- Fused: the norm's fused op (`norm(x, residual)` for a norm whose class convert() swapped,
  so its hooks see the fused output; its kind's fused op on the state of a plain norm, which
  is what a norm reached through a child module stays, and what replaces a fused one after
  `nn.SyncBatchNorm.convert_sync_batchnorm`; `fused_dual_forward` for two norms).
- Unfused, exactly as the original forward computed it: where the residual is not a tensor of
  the norm input's shape and device (broadcasting), or of another dtype for an out-of-place
  add (type promotion); where an input is not 4-D (an nn.SyncBatchNorm in a 3-D network);
  where the norm is no longer of a kind convert() fuses, or a plain one has hooks.
- For two norms: the dual op only when both can take it (no hooks, synchronized alike,
  same shape, dtype and device); else the second norm runs as a module and the first takes
  its output as the residual.

A norm reached through child modules (Hugging Face's `self.layer(x)` whose last conv layer
ends in its BatchNorm, a torchvision shortcut `Sequential(conv, bn)`) is not called as a
module: a `BranchCall`, at the place the child was called, runs the child's forward up to the
norm (a `Program` made from it). If any module on that path has hooks at call time, it calls
the child as a module instead, so the hooks fire on the values they always saw, and the site
completes the pattern unfused.

Under torch.fx symbolic tracing of a converted model the tensors are Proxies whose shapes are
unknown: the sites then record the fused op (whose argument checks raise a ValueError for a
residual of another shape), as torch.fx records any shape-specialized computation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import _norms
from ._programs import Program
from .distributed.functional import sync_dual_bn_add_relu
from .functional import dual_bn_add_relu
from .modules import FusedNorm, NormState, check_4d, norm_call_args


@torch.fx.wrap
def fused_dual_forward(input: Tensor, input2: Tensor, state: NormState, state2: NormState, backend: str,
                       synchronized: bool = False, process_group: dist.ProcessGroup | None = None) -> Tensor:
    """relu(norm(input) + norm2(input2)) in one fused op (torch.fx records one call). With
    `synchronized` (both norms synchronized over `process_group`, in the same mode) and in
    training, both norms' statistics are synchronized (`sync_dual_bn_add_relu`); as
    nn.SyncBatchNorm, eval mode never synchronizes."""
    check_4d(input)
    if input2.dtype != input.dtype:
        input2 = input2.to(input.dtype)
    a, a2 = norm_call_args(state), norm_call_args(state2)
    args = (input, a.running_mean, a.running_var, a.weight, a.bias,
            input2, a2.running_mean, a2.running_var, a2.weight, a2.bias, a.training, a.momentum, a.eps)
    options = dict(training2=a2.training, momentum2=a2.momentum, eps2=a2.eps, backend=backend)
    if synchronized and state.training:
        return sync_dual_bn_add_relu(*args, **options, process_group=process_group)
    return dual_bn_add_relu(*args, **options)


def resolve(module: nn.Module, path: tuple[str, ...]) -> Any:
    for name in path:
        module = getattr(module, name, None)
    return module


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def _plain_output(norm: nn.Module, x: Tensor) -> Tensor:
    """What the norm computed in the original model. A norm whose class convert() swapped
    applies the ReLU when called, so its plain class's forward runs (its hooks do not fire:
    the one case in which a hook registered after convert() is skipped)."""
    kind = _norms.kind_of(norm)
    if kind is not None and type(norm) is kind.fused:
        return kind.plain.forward(norm, x)
    return norm(x)


@dataclass(frozen=True)
class BranchCall:
    """Called where the original forward called a child module whose output is a norm's
    output (at `path` below it): returns (True, the norm's input), computed by `prefix` (the
    child's forward up to the norm), or (False, the child's output) when a module on the path
    has hooks or is no longer of the class it was, or the norm is no longer a plain norm of a
    kind convert() fuses."""

    path: tuple[str, ...]
    prefix: Program
    guarded: tuple[tuple[tuple[str, ...], type], ...]  # every module on the path: (path, class)

    __name__ = "fused_branch"

    def __call__(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[bool, Any]:
        for path, cls in self.guarded:
            m = module
            for name in path:
                m = getattr(m, name, None)
            if not isinstance(m, cls) or _hooked(m):
                return False, module(*args, **kwargs)
        norm = module
        for name in self.path:
            norm = getattr(norm, name, None)
        kind = _norms.kind_of(norm)
        if kind is None or type(norm) is not kind.plain or _hooked(norm):
            return False, module(*args, **kwargs)
        return True, self.prefix.fn(module, *args, **kwargs)

    def __deepcopy__(self, memo: dict) -> BranchCall:
        return self


@dataclass(frozen=True)
class Site:
    """One fused pattern in a rewritten forward, called as `site(m, v)` (norm → ReLU),
    `site(m, v, residual=r)` (norm → add → ReLU) or `site(m, v, m2, v2)` (two norms → add →
    ReLU). `m` is the norm (`path` empty) or the child module through which the norm is
    reached; `v` is the norm's input, or the `BranchCall` result for a child."""

    label: str
    backend: str
    path: tuple[str, ...] = ()
    path2: tuple[str, ...] | None = None  # the second norm (a dual site)
    out_of_place: bool = False  # the add was `a + b` (types promote), not `a += b`

    __name__ = "fused_site"

    def __call__(self, m: nn.Module, v: Any, m2: nn.Module | None = None, v2: Any = None,
                 residual: Any = None) -> Tensor:
        norm, x = _branch(self.path, m, v)
        if self.path2 is not None:
            norm2, x2 = _branch(self.path2, m2, v2)
            if norm is not None and norm2 is not None and _dual_ok(norm, x, norm2, x2):
                kind = _norms.kind_of(norm)
                group = norm.process_group if kind.synchronized else None
                return fused_dual_forward(x, x2, kind.state(norm), _norms.norm_state(norm2), self.backend,
                                          kind.synchronized, group)
            residual = x2 if norm2 is None else norm2(x2)  # norm2 stays plain: a module call
        if norm is None:  # the child ran as a module: x is the norm's output
            return self._unfused(x, residual)
        kind = _norms.kind_of(norm)
        if kind is not None and self._layout_ok(x, residual):
            if type(norm) is kind.fused:
                return norm(x) if residual is None else norm(x, residual)
            if not _hooked(norm):
                return kind.fused.run(norm, x, residual, self.backend)
        return self._unfused(_plain_output(norm, x), residual)

    def _layout_ok(self, x: Any, residual: Any) -> bool:
        """Whether the fused op computes what the original does with these tensors: a 4-D
        input, and a residual (if any) of its shape and device, and of its dtype when the add is
        out of place (in place, `y += residual` casts to y's dtype, as the fused op does). Under
        torch.fx the shapes are unknown: see the module doc."""
        if _symbolic(x, residual):
            return True
        if not isinstance(x, Tensor) or x.dim() != 4:
            return False
        return residual is None or (
            isinstance(residual, Tensor) and residual.shape == x.shape and residual.device == x.device
            and (residual.dtype == x.dtype or (not self.out_of_place and residual.is_floating_point())))

    def _unfused(self, y: Tensor, residual: Any) -> Tensor:
        if residual is not None:
            y = y + residual if self.out_of_place else y.add_(residual)
        return torch.relu(y)

    def __deepcopy__(self, memo: dict) -> Site:
        return self


def _symbolic(x: Any, other: Any) -> bool:
    """Whether the values are being traced without their shapes to compare: torch.fx proxies,
    or torch.jit.trace (whose sizes are traced tensors; there the functional layer computes
    nn's own composition, decompositions.exporting_unfused, which takes any shapes)."""
    return (isinstance(x, torch.fx.Proxy) or isinstance(other, torch.fx.Proxy)
            or torch._C._get_tracing_state() is not None)


def _branch(path: tuple[str, ...], m: nn.Module, v: Any) -> tuple[nn.Module | None, Any]:
    """(norm, its input), or (None, the norm's output) for a child that ran as a module."""
    if not path:
        return m, v
    ready, value = v
    if not ready:
        return None, value
    for name in path:
        m = getattr(m, name, None)
    return m, value


def _dual_ok(norm: nn.Module, x: Any, norm2: nn.Module, x2: Any) -> bool:
    kind, kind2 = _norms.kind_of(norm), _norms.kind_of(norm2)
    if kind is None or kind2 is None or type(norm2) is not kind2.plain or _hooked(norm) or _hooked(norm2) \
            or not _norms.dual_compatible(norm, norm2):
        return False
    if _symbolic(x, x2):
        return True
    return (isinstance(x, Tensor) and isinstance(x2, Tensor) and x.dim() == 4 and x2.shape == x.shape
            and x2.dtype == x.dtype and x2.device == x.device)


class FoldedReLU(nn.ReLU):
    """What convert() makes of an nn.ReLU module that its container's forward calls once,
    right after a norm it fuses (the container's attribute path `norm`): the same module object
    (its class swapped), whose call returns its input while that norm, fused, applies the ReLU.
    The container keeps its own class and forward.

    Should that norm lose its fused class (`nn.SyncBatchNorm.convert_sync_batchnorm` after
    convert() puts a new, plain nn.SyncBatchNorm in its place), it applies the ReLU itself, so
    the ReLU is never dropped; `convert` fuses such a pair again. The container is held as a
    plain attribute, not a submodule (no state_dict entry, no cycle in `modules()`); deepcopy
    and pickle point it at the copy's container. `unconvert` makes it an nn.ReLU again."""

    def fold(self, container: nn.Module, norm: str) -> None:
        self.__dict__["_container"] = container  # bypasses nn.Module.__setattr__: not a child
        self.norm = norm

    def unfold(self) -> nn.Module | None:
        """Make this module an nn.ReLU again; returns the norm it was folded into."""
        norm = resolve(self.__dict__.pop("_container"), tuple(self.__dict__.pop("norm").split(".")))
        self.__class__ = nn.ReLU
        return norm

    def forward(self, input: Tensor) -> Tensor:
        norm = self._container
        for name in self.norm.split("."):
            norm = getattr(norm, name, None)
        if isinstance(norm, FusedNorm):
            return input
        return F.relu(input, inplace=self.inplace)

    def extra_repr(self) -> str:
        return f"norm={self.norm!r}"
