"""The data-flow matcher of convert(): which norms sit in an exactly fusable pattern, found in
what each module computes, not in its class.

Every module that holds a BatchNorm is traced shallowly (`_trace`: its own forward, submodules
as calls), children first. In each graph a *source* is a node whose value is a norm's output:
a call of the norm itself, or a call of a child module whose forward returns a norm's output
(its `Ending`, found in the child's own graph, through nn.Identity modules too: Hugging
Face's last conv layer of a block, a `Sequential(conv, bn)` shortcut). From each source the
matcher follows the data flow, as torch.ao.quantization's FX pattern matching does, through
nn.Identity modules (no hooks), to:
- a ReLU (nn.ReLU, F.relu, torch.relu, Tensor.relu, their in-place forms): norm → ReLU;
- an add (`+`, `+=`, torch.add, Tensor.add / add_, alpha 1, either operand order) whose sum
  goes to a ReLU: norm → add → ReLU, or, when the other operand is a source too, the dual
  norm + norm → add → ReLU.
A pattern is exact only where nothing else sees its intermediate values: the norm's output and
the sum each have one user; the norm is of a kind convert() fuses (`_norms`), called once,
registered once, with no hooks, and no module on its path, nor the ReLU module, has hooks; an
in-place add updates the norm's output, not the other operand; the other operand is a computed
tensor (a constant, a parameter or a buffer would broadcast). Shapes and dtypes are not known
from a graph: the fused forward checks them at each call and runs the original computation
where they differ (`_blocks.Site`). Anything else is left, with the reason the report prints.
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from . import _norms
from ._trace import INPLACE_OPERATORS, patched, trace_module

_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)
_RELU_METHODS = ("relu", "relu_")
_INPLACE_OPS = {getattr(operator, f"i{name}") for name in INPLACE_OPERATORS}


@dataclass
class Ending:
    """A traced module's forward returns a norm's output: `node` in its graph calls the norm
    (`child` None) or a child that ends in it; `identities` are the nn.Identity calls between."""

    traced: Traced
    node: torch.fx.Node
    norm: nn.Module
    path: tuple[str, ...]  # from the module to the norm
    identities: tuple[torch.fx.Node, ...]
    child: Ending | None
    guarded: tuple[tuple[tuple[str, ...], type], ...]  # modules below it on the path: (path, class)


@dataclass
class Source:
    """A node of a module's graph whose value is a norm's output."""

    node: torch.fx.Node
    norm: nn.Module
    path: tuple[str, ...]  # from the module whose graph holds the node to the norm
    ending: Ending | None  # None: the node calls the norm itself
    reason: str | None = None  # why it cannot fuse, if it cannot

    @property
    def name(self) -> str:
        return ".".join(self.path)


@dataclass
class SitePlan:
    kind: str  # "relu", "add" (norm → add → ReLU) or "dual"
    main: Source
    relu: torch.fx.Node
    label: str
    other: Source | None = None
    add: torch.fx.Node | None = None
    residual: torch.fx.Node | None = None
    between: tuple[torch.fx.Node, ...] = ()  # nn.Identity calls the site replaces
    out_of_place: bool = False
    fold: bool = False  # a ReLU module called once: made a FoldedReLU, the forward kept

    @property
    def norms(self) -> int:
        return 2 if self.other is not None else 1


@dataclass
class Traced:
    path: str
    module: nn.Module
    graph: torch.fx.Graph | None
    error: str | None
    reads_training: bool = False
    sites: list[SitePlan] = field(default_factory=list)
    left: list[tuple[str, str]] = field(default_factory=list)  # (norm path from here, reason)
    ending: Ending | None = None

    @property
    def rewrites(self) -> bool:
        return any(not s.fold for s in self.sites)


def _describe(node: torch.fx.Node, root: nn.Module) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(root.get_submodule(node.target)).__name__})"
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method":
        return f".{node.target}()"
    return "the output" if node.op == "output" else node.op


def _uses(user: torch.fx.Node, node: torch.fx.Node) -> int:
    """How many times `user` takes `node` (in lists and tuples too: torch.cat([a, b]))."""
    count = 0

    def visit(arg: torch.fx.Node) -> torch.fx.Node:
        nonlocal count
        count += arg is node
        return arg

    torch.fx.node.map_arg((user.args, user.kwargs), visit)
    return count


class _Graph:
    """One traced module's graph, indexed for the matcher."""

    def __init__(self, traced: Traced, registered: Counter, calls: Counter,
                 endings: dict[int, Ending]) -> None:
        self.t, self.root, self.registered, self.endings = traced, traced.module, registered, endings
        self.calls = calls  # module id -> its calls in all traced forwards (an fx-flattened copy too)
        self.modules: dict[str, nn.Module] = {}
        self.read: set[str] = set()
        self.order = {n: i for i, n in enumerate(traced.graph.nodes)}
        for n in traced.graph.nodes:
            if n.op == "call_module":
                self.modules[n.target] = self.root.get_submodule(n.target)
            elif n.op == "get_attr":
                self.read.add(n.target.rsplit(".", 1)[0])

    def module(self, node: torch.fx.Node) -> nn.Module | None:
        return self.modules.get(node.target) if node.op == "call_module" else None

    def transparent(self, node: torch.fx.Node, value: torch.fx.Node) -> bool:
        m = self.module(node)
        return (type(m) is nn.Identity and not _norms.has_hooks(m) and node.args == (value,)
                and not node.kwargs)

    def follow(self, node: torch.fx.Node
               ) -> tuple[torch.fx.Node | None, tuple[torch.fx.Node, ...], str | None]:
        """The one user of `node`'s value past nn.Identity calls, with those calls; or a reason."""
        chain = []
        while True:
            users = list(node.users)
            if len(users) != 1 or _uses(users[0], node) != 1:
                n = sum(_uses(u, node) for u in users)
                why = "its output is not used" if n == 0 else f"its output is used {n} times"
                return None, tuple(chain), why
            if not self.transparent(users[0], node):
                return users[0], tuple(chain), None
            node = users[0]
            chain.append(node)

    def back(self, node: object) -> object:
        """`node` past nn.Identity calls that only pass it on."""
        while isinstance(node, torch.fx.Node) and node.op == "call_module" and len(node.args) == 1 \
                and len(node.users) == 1 and self.transparent(node, node.args[0]):
            node = node.args[0]
        return node

    def call_reason(self, node: torch.fx.Node, what: str) -> str | None:
        """Why the module `node` calls cannot be taken into a pattern (hooks, shared, called
        twice, its tensors read elsewhere in this forward)."""
        m = self.modules[node.target]
        if _norms.has_hooks(m):
            return f"{what}has module hooks"
        if self.registered[id(m)] > 1:
            return f"{what}is registered under {self.registered[id(m)]} names"
        if self.calls[id(m)] > 1:
            return f"{what}is called {self.calls[id(m)]} times"
        if node.target in self.read:
            return f"{what}has its parameters or buffers read by the forward"
        return None

    def source(self, node: torch.fx.Node) -> Source | None:
        m = self.module(node)
        if m is None or _norms.is_fused(m):
            return None
        path = tuple(node.target.split("."))
        if _norms.is_batch_norm(m):
            reason = self.call_reason(node, "")
            if _norms.plain_kind(m) is None:
                base = next(c.__name__ for c in type(m).__mro__
                            if c.__module__.startswith(("torch.", "torchvision.")))
                name = type(m).__name__
                what = name if base == name else f"{name} (a {base} subclass)"
                reason = f"is a {what}, not a norm convert() fuses ({_norms.names()})"
            elif len(node.args) != 1 or node.kwargs:
                reason = "is called with other arguments than its input"
            return Source(node, m, path, None, reason)
        ending = self.endings.get(id(m))
        if ending is None:
            return None
        reason = self.call_reason(node, f"its output is returned by {node.target}, which ")
        return Source(node, ending.norm, path + ending.path, ending, reason)


def _relu_reason(g: _Graph, node: torch.fx.Node, value: torch.fx.Node) -> str | None:
    """None when `node` is relu(value) convert() can fold in; else why not."""
    if node.op == "call_module":
        m = g.modules[node.target]
        if type(m) is not nn.ReLU:
            return f"it goes to {_describe(node, g.root)}, not a ReLU"
        if _norms.has_hooks(m):
            return f"ReLU module {node.target} has module hooks"
        return None if node.args == (value,) and not node.kwargs else "the ReLU takes other arguments"
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        extra = set(node.kwargs) - {"inplace"}
        ok = node.args[0] is value and len(node.args) <= 2 and not extra
        return None if ok else "the ReLU takes other arguments"
    if node.op == "call_method" and node.target in _RELU_METHODS:
        return None if node.args == (value,) and not node.kwargs else "the ReLU takes other arguments"
    return f"it goes to {_describe(node, g.root)}, not a ReLU"


def _add(node: torch.fx.Node) -> tuple[bool, str | None] | None:
    """(in place, why it cannot fuse) for an add; None for anything else."""
    if node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add):
        inplace = node.target is operator.iadd
    elif node.op == "call_method" and node.target in ("add", "add_"):
        inplace = node.target == "add_"
    else:
        return None
    if len(node.args) != 2 or set(node.kwargs) - {"alpha"}:
        return inplace, "the add takes other arguments (out=)"
    alpha = node.kwargs.get("alpha", 1)
    return inplace, None if isinstance(alpha, int | float) and alpha == 1 else f"the add has alpha={alpha}"


def _relu_name(node: torch.fx.Node) -> str:
    return node.target if node.op == "call_module" else "relu"


def _changed_in_place(g: _Graph, value: object, start: torch.fx.Node, end: torch.fx.Node) -> bool:
    """Whether a node between `start` and `end` updates `value` in place (the fused op reads the
    norm's input at the add, later than the norm did)."""
    lo, hi = g.order[start], g.order[end]
    for n in g.t.graph.nodes:
        if lo < g.order[n] < hi and n.args and n.args[0] is value:
            m = g.module(n)
            if (n.op == "call_function" and (n.target in _INPLACE_OPS or n.kwargs.get("inplace"))) \
                    or (n.op == "call_method" and n.target.endswith("_")) \
                    or (m is not None and getattr(m, "inplace", False) is True):
                return True
    return False


def _match_source(g: _Graph, src: Source, sources: dict[torch.fx.Node, Source], claimed: set) -> None:
    t = g.t
    if src.reason is not None:
        t.left.append((src.name, src.reason))
        return
    user, chain, reason = g.follow(src.node)
    if user is None:
        t.left.append((src.name, reason))
        return
    if user.op == "output":
        return  # the forward's output: its caller decides (the module's Ending), see `analyze`
    add = _add(user)
    if add is None:
        value = chain[-1] if chain else src.node
        reason = _relu_reason(g, user, value)
        if reason is None:
            t.sites.append(SitePlan("relu", src, user, f"{src.name}+{_relu_name(user)}", between=chain))
        else:
            t.left.append((src.name, reason.replace("it goes to", "its output goes to")
                           .replace("not a ReLU", "not to a ReLU or an add")))
        return
    _match_add(g, src, chain, user, add, sources, claimed)


def _match_add(g: _Graph, src: Source, chain: tuple, add: torch.fx.Node, form: tuple[bool, str | None],
               sources: dict[torch.fx.Node, Source], claimed: set) -> None:
    t = g.t
    inplace, reason = form
    feed = {src.node: chain[-1] if chain else src.node}
    other = add.args[1] if add.args[0] is feed[src.node] else add.args[0]
    partner = sources.get(g.back(other)) if isinstance(other, torch.fx.Node) else None
    if partner is not None:
        user, partner_chain, _ = g.follow(partner.node)
        if partner.reason is not None or partner.node in claimed or user is not add:
            partner = None
        else:
            feed[partner.node] = partner_chain[-1] if partner_chain else partner.node
    relu, chain2, why = g.follow(add)
    if reason is None and relu is None:
        reason = why.replace("its output", "its sum")
    elif reason is None:
        reason = _relu_reason(g, relu, chain2[-1] if chain2 else add)
        reason = reason and reason.replace("it goes to", "its sum goes to")
    if reason is None and not isinstance(other, torch.fx.Node):
        reason = f"it is added to a constant ({other!r})"
    elif reason is None and other.op == "get_attr":
        reason = f"it is added to {other.target} (a parameter or buffer: it would broadcast)"
    elif reason is None and inplace and add.args[0] is other and partner is None:
        what = other.target if other.op == "placeholder" else _describe(other, g.root)
        reason = f"its add updates the output of {what} in place (the fused op would not)"
    if reason is not None:
        t.left.append((src.name, reason))
        return
    main, second = src, partner
    if partner is not None and (add.args[0] is feed[partner.node] if inplace
                                else src.ending is not None and partner.ending is None):
        main, second = partner, src  # in place: the updated operand; else a direct norm first
    out_of_place = not inplace or add.args[0] is not feed[main.node]
    if second is not None and not _norms.dual_compatible(main.norm, second.norm):
        claimed.add(second.node)
        t.left.append((second.name, f"it is added to {main.name} but synchronized differently (one dual op "
                                    "needs both norms synchronized alike)"))
        second = None
    direct = [s for s in (main, second) if s is not None and s.ending is None]
    if any(_changed_in_place(g, s.node.args[0], s.node, add) for s in direct):
        t.left.append((src.name, "its input is changed in place before the add"))
        return
    between = g.follow(main.node)[1] + chain2
    name = _relu_name(relu)
    if second is not None:
        claimed.add(second.node)
        label = f"{main.name}+{second.name}+add+{name}"
        between += g.follow(second.node)[1]
        t.sites.append(SitePlan("dual", main, relu, label, second, add, None, between, out_of_place))
    else:
        residual = add.args[1] if add.args[0] is feed[main.node] else add.args[0]
        t.sites.append(SitePlan("add", main, relu, f"{main.name}+add+{name}", None, add, residual, between,
                                out_of_place))


def _ending(g: _Graph, sources: dict[torch.fx.Node, Source]) -> Ending | None:
    """The module's Ending: its output is a fusable source's value (through nn.Identity)."""
    out = next(n for n in g.t.graph.nodes if n.op == "output").args[0]
    if not isinstance(out, torch.fx.Node) or g.t.reads_training:
        return None
    src = sources.get(g.back(out))
    if src is None or src.reason is not None or g.follow(src.node)[0] is None:
        return None
    user, chain, _ = g.follow(src.node)
    if user.op != "output":
        return None
    guarded = tuple((tuple(c.target.split(".")), type(g.modules[c.target])) for c in chain)
    if src.ending is not None:
        head = tuple(src.node.target.split("."))
        guarded += ((head, type(g.modules[src.node.target])),)
        guarded += tuple((head + p, cls) for p, cls in src.ending.guarded)
    return Ending(g.t, src.node, src.norm, src.path, chain, src.ending, guarded)


def analyze(traced: Traced, registered: Counter, calls: Counter, endings: dict[int, Ending]) -> None:
    """Fill `traced.sites`, `.left` and `.ending` from its graph (its children analyzed first);
    `registered` and `calls`: how often each module (by id) is registered in the model and
    called in all the traced forwards."""
    g = _Graph(traced, registered, calls, endings)
    sources = {n: s for n in traced.graph.nodes if (s := g.source(n)) is not None}
    claimed: set[torch.fx.Node] = set()
    for node, src in sources.items():
        if node not in claimed:
            claimed.add(node)
            _match_source(g, src, sources, claimed)
    for site in traced.sites:
        if site.kind == "relu" and site.main.ending is None and site.relu.op == "call_module":
            relu = g.modules[site.relu.target]
            site.fold = calls[id(relu)] == 1 and registered[id(relu)] == 1
    if traced.reads_training:  # a rewritten forward would keep the mode it was traced in
        for site in [s for s in traced.sites if not s.fold]:
            traced.sites.remove(site)
            why = "the forward that calls it reads self.training (a rewritten forward would keep one mode)"
            traced.left.extend((s.name, why) for s in (site.main, site.other) if s is not None)
    traced.ending = _ending(g, sources)
    for node, src in sources.items():  # returned, but not as the module's Ending: nobody decides
        if src.reason is None and g.follow(node)[0] is not None and g.follow(node)[0].op == "output" \
                and (traced.ending is None or traced.ending.node is not node):
            why = "its output is returned by the forward" + (
                " (which reads self.training)" if traced.reads_training else " with other values")
            traced.left.append((src.name, why))


def trace_all(model: nn.Module) -> list[Traced]:
    """Shallow traces of every module that holds a BatchNorm, children before parents."""
    order = list(model.named_modules())
    holds: dict[int, bool] = {}
    for _, m in reversed(order):
        holds[id(m)] = _norms.is_batch_norm(m) or any(holds.get(id(c), False) for c in m.children())
    result = []
    with patched():
        for path, m in reversed(order):
            if not holds[id(m)] or _norms.is_batch_norm(m) or type(m).forward is nn.Module.forward:
                continue
            graph, error, reads = trace_module(m)
            result.append(Traced(path, m, graph, error, reads))
    return result
