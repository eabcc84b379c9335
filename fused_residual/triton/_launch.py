"""How the Triton ops are registered and launched: `triton_op` (torch.library registration
with the declared schema on every supported torch), `wrap_triton` (or, under the interpreter,
a direct launch that skips fake tensors) and `device_guard`, the context every launcher runs
its kernels in (the tensors' device made current, as the C++ ops' CUDAGuard does).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import torch
from torch import Tensor

# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when these modules load.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


class _InterpretedLaunch:
    """`kernel[grid](...)` that skips the launch on fake or meta tensors (shape propagation,
    FakeTensor tracing): the interpreter would try to read their data."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            from torch._subclasses.fake_tensor import is_fake

            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
            if any(t.device.type == "meta" or is_fake(t) for t in tensors):
                return None
            return self.kernel[grid](*args, **kwargs)

        return launch


def wrap_triton(kernel):
    """`torch.library.wrap_triton`, except under the interpreter, where the kernel is
    launched directly (older torch versions reject interpreted kernels in wrap_triton).
    Named like torch's function so that torch's kernel discovery for `triton_op`s
    (`torch._library.triton.get_inner_triton_kernels`) still finds the kernels."""
    if INTERPRETED:
        return _InterpretedLaunch(kernel)
    return torch.library.wrap_triton(kernel)


def triton_op(name: str, *, mutates_args: tuple[str, ...], schema: str) -> Callable[[Callable], object]:
    """`torch.library.triton_op` registered with exactly `schema`, on every supported torch.

    torch 2.11's `triton_op` accepts `schema=` but registers the schema inferred from the
    function's annotations instead (`torch._library.triton`: `schema=infer_schema(fn, ...)`),
    which loses the return names and turns `int` into `SymInt`, so the Triton ops would not
    have the extension's schemas (csrc/ops.cpp). Later versions pass `schema` through. For the
    registration only, the inference that module calls answers `schema` for this function;
    on a torch that honours `schema=` it is never called."""

    def register(fn: Callable) -> object:
        import torch._library.triton as triton_library

        inferred = getattr(triton_library, "infer_schema", None)

        def infer_schema(f: Callable, *args: object, **kwargs: object) -> str:
            return schema if f is fn else inferred(f, *args, **kwargs)

        if inferred is not None:
            triton_library.infer_schema = infer_schema
        try:
            return torch.library.triton_op(name, mutates_args=mutates_args, schema=schema)(fn)
        finally:
            if inferred is not None:
                triton_library.infer_schema = inferred

    return register


# Device modules whose `device(d)` context makes `d` the current device, so that a Triton
# launch (which targets the current device and its current stream) runs on the tensors'
# device. A dict rather than a branch so that tests can stand in a mock for "cpu".
GUARDED_DEVICE_TYPES = {"cuda": torch.cuda}


def device_guard(device: torch.device):
    """The context every launcher runs its kernels in: the current device is `device` (as
    the C++ ops' CUDAGuard), so a tensor on cuda:1 is never touched by a launch on cuda:0's
    stream. A no-op for device types without a guard (the interpreter's CPU tensors)."""
    module = GUARDED_DEVICE_TYPES.get(device.type)
    if module is None:
        return contextlib.nullcontext()
    return module.device(device)
