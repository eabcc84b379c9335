"""Which float instructions of a PTX text are not IEEE: shared by tests/triton_aot.py (the
Triton kernels, compiled for sm_90) and tests/test_gpu_static.py (the CUDA extension's
embedded PTX, and the unit test of these two functions).

The numerics contract (docs/op_layer.md) has no approximate math and no flush-to-zero:
PyTorch's BatchNorm computes invstd = 1 / sqrt(var + eps) with a correctly rounded square
root and division, and keeps denormals. In PTX that means:

* no `.ftz` on any instruction (arithmetic, conversions, comparisons, min/max: a flushed
  comparison turns a denormal y > 0 into a 0 mask bit);
* sqrt, rcp and div only in their `.rn` (or integer) forms: `sqrt.approx`, `rcp.approx`,
  `div.approx` and `div.full` (Triton's fp32 `/`, within 2 ulp) are approximations;
* no rsqrt, ex2, lg2, sin, cos or tanh at all: PTX has them only as `.approx`.
"""

from __future__ import annotations

import re

# An instruction's full spelling (`div.rn.f32`, `sqrt.approx.ftz.f32`, `setp.gt.ftz.f32`):
# the special-function ones, and any with `.ftz`.
_SPECIAL = r"\b(?:sqrt|rsqrt|rcp|div|ex2|lg2|sin|cos|tanh)(?:\.[a-z0-9]+)+"
_FTZ = r"\b[a-z][a-z0-9_]*(?:\.[a-z0-9]+)*\.ftz(?:\.[a-z0-9]+)*"
_ONLY_APPROXIMATE = {"rsqrt", "ex2", "lg2", "sin", "cos", "tanh"}


def float_math(ptx: str) -> list[str]:
    """The distinct spellings of the special-function and `.ftz` instructions in `ptx`."""
    return sorted(set(re.findall(f"{_SPECIAL}|{_FTZ}", ptx)))


def is_inexact(spelling: str) -> bool:
    """True for an approximate or flush-to-zero instruction (see the module docstring)."""
    op, *modifiers = spelling.split(".")
    return "ftz" in modifiers or "approx" in modifiers or "full" in modifiers or op in _ONLY_APPROXIMATE


def inexact_math(ptx: str) -> list[str]:
    """The approximate or flush-to-zero instructions of `ptx` (empty when it is IEEE)."""
    return [s for s in float_math(ptx) if is_inexact(s)]
