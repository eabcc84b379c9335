"""Shallow torch.fx traces for convert(): one module's own forward, every submodule a leaf
(`call_module`), so that each module is traced once and a failure (data-dependent control
flow) loses that module's own forward only: its children are traced on their own.

`trace_module` is `torch.fx.Tracer.trace` reduced to what a shallow trace needs, because the
full tracer costs ~10 ms per module on a 2-core CPU: per trace it patches every function ever
registered with `torch.fx.wrap` (torchvision registers dozens) and scans the globals of each
called module for functions to autowrap. A shallow trace calls no submodule's code, so it
patches only `nn.Module.__call__` / `__getattr__` (as the tracer does), once for all the
modules of a model (`patched`), and autowraps nothing.

Two differences from torch.fx, both so that a rewritten forward keeps the original's meaning:
- In-place operators (`out += identity`) are recorded as `operator.iadd` (torch.fx's Proxy
  has no `__iadd__`, so Python records `out = out + identity`, losing the in-place update and
  its dtype rule); torch.fx's code generator prints them back as `out += identity`.
- `self.training` is replaced during the trace by a probe that records whether the forward
  read it: a forward that branches on the mode cannot be rewritten (the rewritten forward
  would keep the mode it was traced in).
"""

from __future__ import annotations

import contextlib
import operator
import threading
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx
import torch.fx._symbolic_trace as _fx_symbolic_trace
import torch.nn as nn
from torch.fx._symbolic_trace import Tracer

# torch.fx's "is tracing" flag, which torch.fx's own tracer sets while it traces (modules such
# as torchvision's read it): a thread-local with accessors in torch 2.14, a module global in
# torch 2.11.
if hasattr(_fx_symbolic_trace, "_get_is_fx_tracing"):
    _get_is_fx_tracing = _fx_symbolic_trace._get_is_fx_tracing
    _set_is_fx_tracing = _fx_symbolic_trace._set_is_fx_tracing
else:  # pragma: no cover - torch 2.11
    def _get_is_fx_tracing() -> bool:
        return _fx_symbolic_trace._is_fx_tracing_flag

    def _set_is_fx_tracing(value: bool) -> None:
        _fx_symbolic_trace._is_fx_tracing_flag = value

INPLACE_OPERATORS = ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor",
                     "lshift", "rshift")


class InplaceProxy(torch.fx.Proxy):
    """A Proxy that records `a op= b` as the in-place operator (see module doc)."""


def _inplace_method(op: Any) -> Any:
    def method(self: torch.fx.Proxy, other: Any) -> torch.fx.Proxy:
        return self.tracer.create_proxy("call_function", op, (self, other), {})

    return method


for _name in INPLACE_OPERATORS:
    setattr(InplaceProxy, f"__i{_name}__", _inplace_method(getattr(operator, f"i{_name}")))


class ModeProbe:
    """Stands in for a module's `training` flag during a trace; records whether it was read."""

    def __init__(self, value: bool) -> None:
        self.value = value
        self.read = False

    def __bool__(self) -> bool:
        self.read = True
        return self.value

    def __eq__(self, other: object) -> bool:
        self.read = True
        return self.value == other

    def __hash__(self) -> int:
        return hash(self.value)


class ShallowTracer(Tracer):
    def __init__(self, root: nn.Module) -> None:
        super().__init__(autowrap_modules=(), autowrap_functions=())
        self.root = root
        self.paths: dict[nn.Module, str] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True

    def proxy(self, node: torch.fx.Node) -> torch.fx.Proxy:
        return InplaceProxy(node, self)

    def path_of_module(self, mod: nn.Module) -> str:
        for name, child in self.root._modules.items():  # most calls: a direct child
            if child is mod:
                return name
        if self.paths is None:
            self.paths = {m: name for name, m in self.root.named_modules()}
        if mod not in self.paths:
            raise NameError(f"{type(mod).__name__} is not installed as a submodule")
        return self.paths[mod]

    def trace_module(self) -> torch.fx.Graph:
        """The graph of the root's own forward; raises what the forward raises on Proxies.
        Runs inside `patched()`."""
        root = self.root
        self.graph = torch.fx.Graph(tracer_cls=type(self))
        self.tensor_attrs = {v: k for k, v in root.__dict__.items() if isinstance(v, torch.Tensor)}
        fn, args = self.create_args_for_root(type(root).forward, True, None)
        self.parameter_cache: dict[str, torch.fx.Proxy] = {}
        _STATE.tracer = self
        try:
            out = fn(*args)
            self.create_node("output", "output", (self.create_arg(out),), {})
        finally:
            _STATE.tracer = None
        return self.graph


_STATE = threading.local()  # the tracer of this thread's trace: other threads' modules run as usual
_CALL, _GETATTR = nn.Module.__call__, nn.Module.__getattr__


def _module_getattr(mod: nn.Module, attr: str) -> Any:
    value = _GETATTR(mod, attr)
    tracer = getattr(_STATE, "tracer", None)
    return value if tracer is None else tracer.getattr(attr, value, tracer.parameter_cache)


def _module_call(mod: nn.Module, *args: Any, **kwargs: Any) -> Any:
    tracer = getattr(_STATE, "tracer", None)
    if tracer is None:
        return _CALL(mod, *args, **kwargs)
    return tracer.call_module(mod, lambda *a, **kw: _CALL(mod, *a, **kw), args, kwargs)


@contextlib.contextmanager
def patched() -> Iterator[None]:
    """nn.Module.__call__ and __getattr__ patched for every trace inside, as torch.fx's tracer
    patches them, but once: setting an attribute of nn.Module invalidates the method caches
    of all its subclasses (thousands, with torchvision and transformers loaded)."""
    old = _get_is_fx_tracing()
    nn.Module.__getattr__, nn.Module.__call__ = _module_getattr, _module_call
    _set_is_fx_tracing(True)
    try:
        yield
    finally:
        nn.Module.__getattr__, nn.Module.__call__ = _GETATTR, _CALL
        _set_is_fx_tracing(old)


def _sequential(module: nn.Sequential) -> torch.fx.Graph:
    """What tracing nn.Sequential.forward gives (each child called on the last one's output),
    built directly: nn.Sequential is most of the containers of a vision model."""
    graph = torch.fx.Graph()
    value = graph.placeholder("input")
    for name in module._modules:
        value = graph.call_module(name, (value,))
    graph.output(value)
    return graph


def trace_module(module: nn.Module) -> tuple[torch.fx.Graph | None, str | None, bool]:
    """(graph, None, reads_training) or (None, the first line of why it does not trace, False).
    Runs inside `patched()`."""
    if type(module).forward is nn.Sequential.forward and None not in module._modules.values():
        return _sequential(module), None, False
    probe = ModeProbe(module.training)
    module.__dict__["training"] = probe
    try:
        graph = ShallowTracer(module).trace_module()
    except Exception as e:
        text = str(e).strip().splitlines()
        return None, f"{type(e).__name__}: {text[0] if text else ''}"[:200], False
    finally:
        module.__dict__["training"] = probe.value
    return graph, None, probe.read
