"""From the matcher's plan to a converted model, and back (`unconvert`).

For each module with a pattern the forward cannot keep (a tail, a functional ReLU, a ReLU
module called twice, a norm reached through a child), its traced graph is rewritten, in the
spirit of PyTorch's FX conv/BN fusion tutorial: every pattern becomes one call of a
`_blocks.Site` placed at its add (or at its norm, for norm → ReLU), and every call of a child
whose output is a norm's becomes a `_blocks.BranchCall` at the same place, running the child's
forward up to the norm (a `Program` made from the child's own, possibly rewritten, graph); the
norm, nn.Identity, add and ReLU nodes it replaces are removed, nothing else. torch.fx's code
generator turns the graph into Python (`_programs.Program`), and the module's class becomes
`_programs.rewritten_class(its class, program, the norms it fused)`.

A norm → ReLU whose ReLU is an nn.ReLU module called once needs no new forward: the norm is
fused and the ReLU becomes a `_blocks.FoldedReLU` (torchvision's and timm's stems,
Sequential containers, Hugging Face's conv layers, DenseNet's layers keep their class).

Everything convert() does is a class swap (norms, ReLU modules, rewritten modules) plus the
`backend` attribute of a fused norm and a FoldedReLU's two attributes, so `unconvert` undoes it
exactly, and `snapshot` / `restore` let `convert_report` plan on the unconverted model.
"""

from __future__ import annotations

from collections import Counter

import torch.fx
import torch.nn as nn

from . import _norms
from ._blocks import BranchCall, FoldedReLU, Site, resolve
from ._match import Ending, SitePlan, Source, Traced, analyze, trace_all
from ._programs import Program, is_rewritten, picklable, rewritten_class


class Planner:
    """Traces and analyzes a model (unconverted), then builds the programs of the modules it
    rewrites; `apply` converts the model in place."""

    def __init__(self, model: nn.Module, backend: str) -> None:
        self.model, self.backend = model, backend
        registered = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
        self.traced = trace_all(model)
        calls = Counter(id(t.module.get_submodule(n.target)) for t in self.traced if t.graph is not None
                        for n in t.graph.nodes if n.op == "call_module")
        endings: dict[int, Ending] = {}
        self.graphs: dict[int, tuple[torch.fx.Graph, dict]] = {}  # final graph of a module, node map
        self.prefixes: dict[int, Program] = {}
        self.programs: dict[int, tuple[Program, tuple[str, ...]]] = {}
        for t in self.traced:
            if t.graph is None:
                continue
            analyze(t, registered, calls, endings)
            if t.ending is not None:
                endings[id(t.module)] = t.ending
            if t.rewrites:
                self._rewrite(t)

    # ----------------------------------------------------------------------------------------

    def _final(self, t: Traced) -> tuple[torch.fx.Graph, dict]:
        return self.graphs.get(id(t.module), (t.graph, {}))

    def prefix(self, ending: Ending) -> Program:
        """The module's forward up to the norm its output comes from: returns the norm's input."""
        key = id(ending.traced.module)
        if key not in self.prefixes:
            graph, node_map = self._final(ending.traced)
            g, vm = torch.fx.Graph(), {}
            g.graph_copy(graph, vm)
            end = vm[node_map.get(ending.node, ending.node)]
            if ending.child is None:
                value = end.args[0]
            else:
                with g.inserting_before(end):
                    module = g.get_attr(ending.node.target)
                    value = g.call_function(self.prefix(ending.child), (module, *end.args), dict(end.kwargs))
            g.output(value)
            for n in reversed([node_map.get(i, i) for i in ending.identities]):
                g.erase_node(vm[n])
            g.erase_node(end)
            self.prefixes[key] = _program(g)
        return self.prefixes[key]

    def _branch(self, t: Traced, g: torch.fx.Graph, vm: dict, src: Source) -> tuple[torch.fx.Node, object]:
        """(the module node, the value node) a site takes for one of its norms."""
        node = vm[src.node]
        with g.inserting_before(node):
            module = g.get_attr(src.node.target)
            if src.ending is None:
                return module, node.args[0]
            child = type(t.module.get_submodule(src.node.target))
            call = BranchCall(src.ending.path, self.prefix(src.ending), (((), child), *src.ending.guarded))
            return module, g.call_function(call, (module, *node.args), dict(node.kwargs))

    def _rewrite(self, t: Traced) -> None:
        g, vm = torch.fx.Graph(), {}
        g.output(g.graph_copy(t.graph, vm))
        for site in t.sites:
            if not site.fold:
                self._replace(t, g, vm, site)
        program = _program(g)
        reason = picklable(program)
        if isinstance(t.module, torch.fx.GraphModule):  # its own code, copies and pickles come from its graph
            reason = "a torch.fx GraphModule's forward is its graph (convert the model before tracing it)"
        if reason is not None:  # keep the forward; its patterns are left, with the reason
            for site in [s for s in t.sites if not s.fold]:
                t.sites.remove(site)
                t.left.append((site.main.name, reason if reason.startswith("a torch.fx") else
                               f"the rewritten forward would not pickle ({reason})"))
            return
        self.graphs[id(t.module)] = (g, vm)
        fused = tuple(s.main.name for s in t.sites if not s.fold and s.main.ending is None)
        self.programs[id(t.module)] = (program, fused)

    def _replace(self, t: Traced, g: torch.fx.Graph, vm: dict, site: SitePlan) -> None:
        m1, v1 = self._branch(t, g, vm, site.main)
        m2 = v2 = None
        if site.other is not None:
            m2, v2 = self._branch(t, g, vm, site.other)
        def below(src: Source) -> tuple[str, ...]:  # the norm's path from the module the node calls
            return src.path[len(src.node.target.split(".")):]

        path2 = None if site.other is None else below(site.other)
        target = Site(site.label, self.backend, below(site.main), path2, site.out_of_place)
        anchor = vm[site.add] if site.add is not None else vm[site.main.node]
        kwargs = {} if site.residual is None else {"residual": vm[site.residual]}
        with g.inserting_before(anchor):
            call = g.call_function(target, (m1, v1) if m2 is None else (m1, v1, m2, v2), kwargs)
        vm[site.relu].replace_all_uses_with(call)
        dead = {vm[n] for n in (site.relu, *site.between, site.add, site.main.node,
                                None if site.other is None else site.other.node) if n is not None}
        for node in reversed(g.nodes):  # users first
            if node in dead:
                g.erase_node(node)

    # ----------------------------------------------------------------------------------------

    def apply(self) -> None:
        for t in self.traced:
            for site in t.sites:
                if site.fold:
                    _norms.fuse(site.main.norm, self.backend)
                    relu = t.module.get_submodule(site.relu.target)
                    relu.__class__ = FoldedReLU
                    relu.fold(t.module, site.main.node.target)
            entry = self.programs.get(id(t.module))
            if entry is not None:
                program, fused = entry
                for name in fused:
                    _norms.fuse(t.module.get_submodule(name), self.backend)
                t.module.__class__ = rewritten_class(type(t.module), program, fused)


def _program(g: torch.fx.Graph) -> Program:
    code = g.python_code(root_module="self")
    return Program(code.src, code.globals)


# --------------------------------------------------------------------------------------------
# Undoing
# --------------------------------------------------------------------------------------------

_ATTRIBUTES = ("backend", "_container", "norm")


def unconvert(model: nn.Module) -> None:
    """Every class convert() swapped back (see module doc), in place."""
    norms = []
    for m in model.modules():
        if isinstance(m, FoldedReLU):
            norms.append(m.unfold())
        elif is_rewritten(m):
            cls = type(m)
            norms.extend(resolve(m, tuple(name.split("."))) for name in cls._fused_norms)
            m.__class__ = cls._fused_base
    for norm in norms:
        if norm is not None:
            _norms.unfuse(norm)


def snapshot(model: nn.Module) -> list:
    return [(m, m.__class__, {k: m.__dict__[k] for k in _ATTRIBUTES if k in m.__dict__})
            for m in model.modules()]


def restore(saved: list) -> None:
    for m, cls, attributes in saved:
        m.__class__ = cls
        for k in _ATTRIBUTES:
            m.__dict__.pop(k, None)
        m.__dict__.update(attributes)
