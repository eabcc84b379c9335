"""Count the Triton kernel versions a pytest selection would JIT-compile on a GPU, without one.

    python scripts/count_triton_kernels.py [--dry] [--gpu-cases] -m smoke tests/   # + pytest args

Runs the selection in this process under Triton's interpreter (CPU tensors) and records, for
every kernel launch, the key a compiling Triton specialises on: the kernel, each tensor
argument's dtype and 16-byte alignment, each integer's class (== 1, divisible by 16, needs 64
bits, other), None arguments, the constexpr values and the launch options (num_warps, ...).
Each distinct key is one compile on a GPU. It prints the count per kernel and in all, which
scripts/gpu_check.sh's header turns into a JIT-time estimate. An estimate: CPU and CUDA
allocations are both at least 16-byte aligned, but a GPU run can skip or add cases (the
Triton backend is not traced by torch.compile under the interpreter, so compile tests that
skip here do compile kernels on a GPU; Inductor's own kernels are not counted).

--dry records each launch without running the kernel (fast; the tests' assertions then fail,
and a test stops launching at its first failure). --gpu-cases also runs the cases marked to
skip without a GPU (`skipif` marks whose reason names a GPU), at their GPU shapes.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections import Counter
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import pytest
import torch
from triton.runtime.interpreter import InterpretedFunction

KEYS: set[tuple] = set()


def _arg_class(value: object, constexpr: bool) -> object:
    if constexpr:
        return ("constexpr", repr(value))
    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.dtype), value.data_ptr() % 16 == 0)
    if isinstance(value, bool) or value is None:
        return ("value", value)
    if isinstance(value, int):
        if value == 1:
            return ("int", "1")
        return ("int", "i64" if abs(value) >= 2**31 else "i32", value % 16 == 0)
    return ("scalar", type(value).__name__)


def _record(self: InterpretedFunction, args: tuple, kwargs: dict) -> None:
    params = list(inspect.signature(self.fn).parameters.values())
    constexpr = {p.name for p in params if "constexpr" in str(p.annotation)}
    bound = dict(zip(self.arg_names, args, strict=False))
    bound.update({k: v for k, v in kwargs.items() if k in self.arg_names})
    options = tuple(sorted((k, v) for k, v in kwargs.items() if k not in self.arg_names))
    key = tuple((name, _arg_class(bound[name], name in constexpr))
                for name in self.arg_names if name in bound)
    KEYS.add((f"{self.fn.__module__}.{self.fn.__name__}", key, repr(options)))


class CountLaunches:
    """pytest plugin: wraps the interpreter's launch for the session."""

    def __init__(self, dry: bool, gpu_cases: bool):
        self.dry, self.gpu_cases = dry, gpu_cases

    def pytest_collection_modifyitems(self, items):
        if self.gpu_cases:
            for item in items:
                item.own_markers = [m for m in item.own_markers if not (
                    m.name == "skipif" and "GPU" in str(m.kwargs.get("reason", "")))]

    def pytest_sessionstart(self, session):
        self._run = InterpretedFunction.run

        def run(fn_self, *args, grid, warmup, **kwargs):
            if not warmup:
                _record(fn_self, args, kwargs)
                if self.dry:
                    return None
            return self._run(fn_self, *args, grid=grid, warmup=warmup, **kwargs)

        InterpretedFunction.run = run

    def pytest_sessionfinish(self, session):
        InterpretedFunction.run = self._run


def main() -> int:
    repo = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(repo))
    args = sys.argv[1:]
    plugin = CountLaunches(dry="--dry" in args, gpu_cases="--gpu-cases" in args)
    args = [a for a in args if a not in ("--dry", "--gpu-cases")]
    status = pytest.main(["-q", "-p", "no:cacheprovider", *args], plugins=[plugin])
    per_kernel = Counter(name for name, _, _ in KEYS)
    print("\nTriton kernel versions a GPU would compile for this selection:")
    for name, count in sorted(per_kernel.items()):
        print(f"  {count:4d}  {name}")
    print(f"  {len(KEYS):4d}  in all ({len(per_kernel)} kernels)")
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
