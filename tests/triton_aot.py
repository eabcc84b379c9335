"""Ahead-of-time compilation of the Triton kernels for sm_90 (H100/H200), without a GPU.

Run as a script (`python tests/triton_aot.py`), never under TRITON_INTERPRET: the op
launchers run on shape-only CPU tensors with `JITFunction.run` replaced by a compile-only
step for `GPUTarget("cuda", 90, 32)`, so every kernel variant is the one the real launch
code (`elementwise_config`, `reduce_config`, `merge_blocks`, ...) picks for that shape. The
calls follow the autograd composition (fused_residual/autograd.py) for the ten ResNet-50
cases (N = 128; bf16 channels_last and fp32 NCHW), forward, backward, eval and dual, plus a
few small cases for the remaining dtypes and flags. For every distinct compiled kernel it
prints one JSON line: registers, stack and local memory (spills) from cuobjdump, shared memory, the widest
global load and store in the PTX, and the resident programs per SM its launch plan assumes
(`fused_residual.triton._common.planned_programs_per_sm`), its special-function and `.ftz`
instructions, and those of them that are approximate or flush to zero (tests/ptx_checks.py).
tests/test_gpu_static.py runs it and applies the budgets.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # before Triton is imported

import torch
import triton
from ptx_checks import float_math, inexact_math  # tests/, this script's directory
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

TARGET = GPUTarget("cuda", 90, 32)
SM90_SMS = 132
BACKEND = make_backend(TARGET)
N = 128
RESNET50_SHAPES = [(64, 56, 56), (256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)]
RESNET50_FORMATS = [("bf16-cl", torch.bfloat16, True), ("fp32-nchw", torch.float32, False)]

_compiled: dict[tuple, dict] = {}
_case = ["?"]


def _global_access_bits(ptx: str, op: str) -> int:
    """The widest `op` (ld / st) of global memory in the PTX, in bits (v4.b32 -> 128)."""
    widest = 0
    for m in re.finditer(rf"\b{op}\.global[\w.:]*?(?:\.v(\d))?\.[bfsu](8|16|32|64)\b", ptx):
        widest = max(widest, int(m.group(1) or 1) * int(m.group(2)))
    return widest


def _resource_usage(cubin: bytes) -> dict:
    """REG, STACK and LOCAL of the kernel in `cubin`, from cuobjdump --dump-resource-usage
    (Triton bundles cuobjdump; the numbers survive Triton's cache, unlike a ptxas -v log)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    assert m, out
    return dict(registers=int(m.group(1)), stack=int(m.group(2)), local=int(m.group(4)))


def _compile_only(self, *args, grid, warmup, **kwargs):
    """JITFunction.run up to the compilation, for TARGET, without a driver; records the
    resources of every new variant."""
    from fused_residual.triton._common import KERNEL_PLANS, planned_programs_per_sm

    binder = create_function_from_signature(self.signature, self.params, BACKEND)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = self._pack_args(BACKEND, kwargs, bound, specialization, options)
    name = self.fn.__name__
    assert 0 < grid[0] < 2**31 and all(0 < g < 2**16 for g in grid[1:]), (name, grid)
    key = (name, str(signature), str(constexprs), str(attrs), options.num_warps)
    entry = _compiled.get(key)
    if entry is None:
        kernel = triton.compile(ASTSource(self, signature, constexprs, attrs), target=TARGET,
                                options=options.__dict__)
        ptx = kernel.asm["ptx"]
        config = {k: v for k, v in kwargs.items() if k.isupper() and not isinstance(v, bool)}
        flags = sorted(k for k, v in kwargs.items() if k.isupper() and v is True)
        entry = dict(kernel=name, config=config, flags=flags, num_warps=options.num_warps,
                     shared=kernel.metadata.shared, ld_bits=_global_access_bits(ptx, "ld"),
                     st_bits=_global_access_bits(ptx, "st"),
                     float_math=float_math(ptx), inexact=inexact_math(ptx), plan=KERNEL_PLANS[name],
                     programs_per_sm=planned_programs_per_sm(name, dual=kwargs.get("DUAL") is True), cases=[],
                     **_resource_usage(kernel.asm["cubin"]))
        _compiled[key] = entry
    if _case[0] not in entry["cases"]:
        entry["cases"].append(_case[0])


def _tensor(shape, dtype, channels_last, offset=0):
    """Never touched: the kernels are only compiled. `offset` elements into its storage (not
    16-byte aligned for offset 1: the launchers' and Triton's unaligned specializations)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    strides = torch.empty(shape, dtype=dtype).contiguous(memory_format=fmt).stride()
    return torch.empty(math.prod(shape) + offset, dtype=dtype)[offset:].as_strided(shape, strides)


def run_case(label: str, shape, dtype, channels_last: bool, affine: bool = True, residual: bool = True,
             offset: int = 0):
    """The op sequences of a training step, an eval step (inference, and a backward through an
    eval-mode BatchNorm) and a downsampling tail (dual), as autograd.py composes them."""
    ops = torch.ops.fused_residual
    x = _tensor(shape, dtype, channels_last, offset)
    c = shape[1]
    count = shape[0] * shape[2] * shape[3]
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    rm, rv = torch.zeros(c, dtype=pdt), torch.ones(c, dtype=pdt)
    w, b = (torch.ones(c, dtype=pdt), torch.zeros(c, dtype=pdt)) if affine else (None, None)
    r = _tensor(shape, dtype, channels_last, offset) if residual else None
    g = _tensor(shape, dtype, channels_last, offset)

    _case[0] = f"{label} forward"
    mean, var = ops.triton_bn_stats(x)
    ops.triton_bn_update_running_stats(mean, var, count, rm, rv, 0.1)
    _, mask = ops.triton_bn_apply(x, r, mean, var, w, b, 1e-5, True)
    _case[0] = f"{label} backward"
    sdy, sdyx, _ = ops.triton_bn_backward_reduce(g, mask, x, mean, var, 1e-5)
    ops.triton_bn_backward_apply(g, mask, x, mean, var, w, sdy, sdyx, 1e-5, count, True, residual)
    _case[0] = f"{label} eval"
    ops.triton_bn_apply(x, r, rm, rv, w, b, 1e-5, False)
    ops.triton_bn_backward_apply(g, mask, x, rm, rv, w, None, None, 1e-5, count, True, residual)
    _case[0] = f"{label} dual"
    x2 = _tensor(shape, dtype, channels_last, offset)
    mean2, var2 = ops.triton_bn_stats(x2)
    _, mask = ops.triton_bn_dual_apply(x, mean, var, w, b, x2, mean2, var2, w, b, 1e-5, 1e-5, True)
    for xi, m, v in ((x, mean, var), (x2, mean2, var2)):
        sdy, sdyx, _ = ops.triton_bn_backward_reduce(g, mask, xi, m, v, 1e-5)
        ops.triton_bn_backward_apply(g, mask, xi, m, v, w, sdy, sdyx, 1e-5, count, True, False)


def main() -> None:
    JITFunction.run = _compile_only
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import fused_residual.triton  # noqa: F401  (registers the ops)
    from fused_residual.triton import _common

    # The launchers size reduction grids by the device's SM count; the CPU tensors here stand
    # for an H100 / H200 (132 SMs).
    _common.TUNING = dataclasses.replace(_common.TUNING, cpu_sm_count=SM90_SMS)

    for fmt, dtype, cl in RESNET50_FORMATS:
        for c, h, w in RESNET50_SHAPES:
            run_case(f"resnet50 {fmt} {c}x{h}x{w}", (N, c, h, w), dtype, cl)
    # The other dtypes and flag values, rows and flat mode, on small shapes.
    for dtype, tag in ((torch.float16, "fp16"), (torch.float64, "fp64")):
        for cl in (False, True):
            run_case(f"extra {tag} {'cl' if cl else 'nchw'}", (8, 64, 14, 14), dtype, cl)
            run_case(f"extra {tag} {'cl' if cl else 'nchw'} 7x7", (8, 96, 7, 7), dtype, cl)
    run_case("extra fp32 cl", (8, 64, 14, 14), torch.float32, True)
    run_case("extra fp32 cl C%8", (8, 60, 7, 7), torch.float32, True)
    run_case("extra fp32 no-affine no-residual", (8, 96, 7, 7), torch.float32, False, affine=False,
             residual=False)
    run_case("extra bf16 HW=1", (16, 2048, 1, 1), torch.bfloat16, False)
    # Odd sizes (C % 8 != 0, odd H*W) and a storage offset of one element: the unaligned paths.
    for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        for cl in (False, True):
            run_case(f"extra {tag} {'cl' if cl else 'nchw'} odd offset 1", (3, 5, 7, 3), dtype, cl, offset=1)
    for entry in _compiled.values():
        print(json.dumps(entry))


if __name__ == "__main__":
    main()
