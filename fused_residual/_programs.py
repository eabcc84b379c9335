"""Rewritten forwards as data: a `Program` is the Python source torch.fx generates for a
rewritten graph plus the globals it names, and a module whose forward convert() rewrote has
its class swapped to `rewritten_class(base, program)`, a subclass of its own class whose only
new method is that forward.

Why a class swap and source code (not an instance attribute, not a GraphModule):
- torch.fx traces `type(root).forward`, and dynamo, DDP and torch.export call the module as
  usual: a method of the module's class is the one forward they all see. Every other method
  and attribute is inherited, `isinstance(m, Base)` holds, and the module stays the same
  object with the same Parameters, buffers, hooks and state_dict keys.
- The forward calls the module's own submodules by attribute (`self.bn1`), so modules replaced
  after convert() (nn.SyncBatchNorm.convert_sync_batchnorm) are the ones it runs.
- `unconvert` puts the base class back: the original forward, exactly.
- Pickling (torch.save of a whole model, copy.deepcopy, multiprocessing) cannot name a class
  made at run time, so the class reduces to `(_rebuild, (base, program, fused_norms))`: the base
  class by reference and the program as its source and globals (modules by name, functions by
  reference, the call sites of `_blocks` by value). A fresh process that imports
  fused_residual rebuilds the same class. Identical programs share one class and one function.
"""

from __future__ import annotations

import itertools
import linecache
import pickle
import types
from typing import Any

import torch.nn as nn

_COMPILED: dict[tuple, types.FunctionType] = {}
_CLASSES: dict[tuple, type] = {}
_COUNTER = itertools.count()


def _key_of(value: Any) -> Any:
    """What identifies a global: floats by repr (math.nan is not equal to itself, nor to the nan
    a fresh process unpickles), unhashable values by identity, the rest by value."""
    if isinstance(value, float):
        return ("float", repr(value))
    try:
        hash(value)
    except TypeError:
        return ("id", id(value))
    return value


class Program:
    """A function `forward(self, ...)` given by its source (from `torch.fx.Graph.python_code`)
    and globals. Callable as `program(module, *args, **kwargs)` (how a rewritten graph calls the
    part of a child module's forward before the norm it ends in). Immutable: copies are itself."""

    __name__ = "fused_prefix"  # torch.fx codegen names call targets by __name__

    def __init__(self, source: str, globals_: dict[str, Any]) -> None:
        self.source = source
        self.globals = dict(globals_)
        self.key = (source, tuple((name, _key_of(v)) for name, v in sorted(self.globals.items())))
        fn = _COMPILED.get(self.key)
        if fn is None:
            filename = f"<fused_residual rewritten forward {next(_COUNTER)}>"
            # Registered with linecache so that tracebacks and inspect show the source.
            linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
            namespace = dict(self.globals)
            exec(compile(source, filename, "exec"), namespace)
            fn = _COMPILED[self.key] = namespace["forward"]
        self.fn = fn

    def __call__(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return self.fn(module, *args, **kwargs)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Program) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)

    def __repr__(self) -> str:
        return f"Program({self.source.strip().splitlines()[0]!r}...)"

    def __deepcopy__(self, memo: dict) -> Program:
        return self

    def __copy__(self) -> Program:
        return self

    def __reduce__(self) -> tuple:
        packed = tuple((name, ("module", v.__name__) if isinstance(v, types.ModuleType) else ("value", v))
                       for name, v in sorted(self.globals.items()))
        return _load_program, (self.source, packed)


def _load_program(source: str, packed: tuple) -> Program:
    import importlib

    return Program(source, {name: importlib.import_module(v) if how == "module" else v
                            for name, (how, v) in packed})


def picklable(program: Program) -> str | None:
    """None when `program` pickles (so a model holding it does); else the first line of why."""
    try:
        pickle.dumps(program)
    except Exception as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def _reduce_rewritten(self: nn.Module, protocol: int) -> tuple:
    cls = type(self)
    state = self.__getstate__() if hasattr(self, "__getstate__") else self.__dict__
    return _rebuild, (cls._fused_base, cls._fused_program, cls._fused_norms), state


def _rebuild(base: type, program: Program, fused_norms: tuple[str, ...]) -> nn.Module:
    cls = rewritten_class(base, program, fused_norms)
    return cls.__new__(cls)


def rewritten_class(base: type, program: Program, fused_norms: tuple[str, ...]) -> type:
    """The subclass of `base` whose forward is `program`; `fused_norms`: the attribute paths of
    the norms convert() made fused for it (what `unconvert` makes plain again)."""
    key = (base, program, fused_norms)
    cls = _CLASSES.get(key)
    if cls is None:
        name = f"Fused{base.__name__}"
        cls = _CLASSES[key] = type(name, (base,), {
            "forward": program.fn,
            "_fused_base": base,
            "_fused_program": program,
            "_fused_norms": fused_norms,
            "__reduce_ex__": _reduce_rewritten,
            "__module__": __name__,
            "__qualname__": name,
            "__doc__": f"{base.__qualname__} with its forward rewritten by fused_residual.convert (the "
                       f"norms {', '.join(fused_norms) or '(none)'} fused); fused_residual.unconvert "
                       f"restores {base.__qualname__}.",
        })
    return cls


def is_rewritten(module: object) -> bool:
    return "_fused_base" in type(module).__dict__


def base_class(cls: type) -> type:
    """The class a rewritten class was made from (itself for any other class)."""
    return cls.__dict__.get("_fused_base", cls)
