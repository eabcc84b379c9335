"""Every primitive op of every fused backend: torch.library.opcheck and op-by-op agreement
with the pure-PyTorch primitives of fused_residual.reference (including the packed mask)."""

from __future__ import annotations

import pytest
import torch
from helpers import FUSED_BACKENDS, INTERPRETED, make_case

from fused_residual import reference as R
from fused_residual.backends import backend_ops

# opcheck's fake-tensor and AOT tests trace the op: a triton_op under the interpreter cannot
# be traced (it reads data pointers), so there only the schema test runs.
FULL_OPCHECK = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def opcheck_utils(backend):
    return ("test_schema",) if backend == "triton" and INTERPRETED else FULL_OPCHECK


def op_samples(dtype, layout, training):
    """(op name, args) for each op on one case, chained as the autograd composition does."""
    x, r, w, b, rm, rv = make_case((2, 3, 5, 3), dtype, layout)
    mean, var = R.bn_stats_reference(x)
    if not training:
        mean, var = rm, rv
    _, mask = R.bn_apply_reference(x, r, mean, var, w, b, 1e-5, True)
    g = torch.randn_like(x)
    sum_dy, sum_dy_xmu, _ = R.bn_backward_reduce_reference(g, mask, x, mean, var, 1e-5)
    count = x.shape[0] * x.shape[2] * x.shape[3]
    sums = (sum_dy, sum_dy_xmu) if training else (None, None)
    return [
        ("stats", (x,)),
        ("update_running_stats", (mean, var, count, rm.clone(), rv.clone(), 0.1)),
        ("apply", (x, r, mean, var, w, b, 1e-5, True)),
        ("apply", (x, None, mean, var, None, None, 1e-5, False)),
        ("backward_reduce", (g, mask, x, mean, var, 1e-5)),
        ("backward_apply", (g, mask, x, mean, var, w, *sums, 1e-5, count, True, True)),
        ("backward_apply", (g, mask, x, mean, var, None, *sums, 1e-5, count, False, True)),
        ("backward_apply", (g, mask, x, mean, var, w, *sums, 1e-5, count, True, False)),
    ]


LAYOUTS = ["nchw", "channels_last", "strided"]


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(backend, dtype, layout, training):
    ops = backend_ops(backend)
    for name, args in op_samples(dtype, layout, training):
        torch.library.opcheck(getattr(ops, name), args, test_utils=opcheck_utils(backend))


def _clone(args):
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def _assert_same(name, got, want, dtype):
    if isinstance(want, tuple):
        assert isinstance(got, tuple | list) and len(got) == len(want), name
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _assert_same(f"{name}[{i}]", g, w, dtype)
        return
    if want is None:
        assert got is None, name
        return
    assert got.shape == want.shape and got.dtype == want.dtype, (name, got.shape, want.shape, got.dtype)
    if want.dtype == torch.uint8:  # the packed mask: bit-exact
        diff = torch.nonzero(got != want)
        assert diff.numel() == 0, f"{name}: mask bytes differ at {diff[:8].flatten().tolist()}"
        return
    if got.dim() == 4:
        assert got.stride() == want.stride(), f"{name}: layout {got.stride()} != {want.stride()}"
    # Same math, different summation order: a few units in the last place of the dtype.
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[got.dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


# The Triton backend takes float16, bfloat16 and float32; the extension float64 too.
BACKEND_DTYPES = [
    (backend, dtype)
    for backend in FUSED_BACKENDS
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)
    if not (backend == "triton" and dtype == torch.float64)
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES, ids=str)
def test_ops_match_reference_primitives(backend, dtype, layout, training):
    ops = backend_ops(backend)
    for name, args in op_samples(dtype, layout, training):
        reference = getattr(R, f"bn_{name}_reference")
        got_args, want_args = _clone(args), _clone(args)
        got = getattr(ops, name)(*got_args)
        want = reference(*want_args)
        _assert_same(name, got, want, dtype)
        if name == "update_running_stats":  # the mutated arguments are the result
            _assert_same(name, tuple(got_args[3:5]), tuple(want_args[3:5]), dtype)
