"""The GPU smoke selection, `pytest -m smoke tests/`; scripts/gpu_check.sh runs its Triton part
(`-m smoke -k triton`) first, while the extension builds.

This module: every fused backend x dtype (float32, bfloat16, float16) x layout (NCHW,
channels_last) x mode (train and eval: bn_add_relu forward+backward; dual: dual_bn_add_relu
training forward+backward) on a small odd shape and a ResNet-50 shape, against eager PyTorch
and a float64 truth under the derived bound (tests/bounds.py), which runs all six ops of each
backend; and the rest of the numerics contract of docs/op_layer.md: the mask bit set exactly
where the output is > 0, and results bitwise equal run to run. Marked `smoke` elsewhere:
NaN/Inf propagation (test_functional.py), CUDA-graph capture (test_ops.py), and one
torch.compile(fullgraph=True) block forward+backward per backend (test_compile.py).

Without a GPU the small shape runs (the extension's CPU kernels, Triton under its interpreter)
and the ResNet-50 shape skips: it is sized for a GPU.
"""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import DEVICE, FUSED_BACKENDS, check_against_reference, fused_fn, run_case
from helpers import make_case as _make_case
from test_dual import check_dual
from test_dual import make_dual_case as _make_dual_case

from fused_residual.backends import backend_ops
from fused_residual.reference import unpack_mask, working_layout

pytestmark = pytest.mark.smoke

SMALL = (2, 3, 5, 7)  # odd sizes: the kernels' unaligned (flat) tiling and partial tiles
RESNET50 = (8, 256, 56, 56)  # a conv2_x tail at N=8: aligned rows, 25088 values per channel
SHAPES = [
    pytest.param(SMALL, id="small"),
    pytest.param(RESNET50, id="resnet50",
                 marks=pytest.mark.skipif(DEVICE != "cuda", reason="a GPU-sized case")),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LAYOUTS = ["nchw", "channels_last"]


@functools.cache
def make_case(shape, dtype, layout, seed=0):
    """helpers.make_case, generated once per module (the tests clone what they change): at the
    ResNet-50 shape, generating the data on the host would take longer than the checks."""
    return _make_case(shape, dtype, layout, seed=seed)


make_dual_case = functools.cache(_make_dual_case)


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", FUSED_BACKENDS)


@pytest.mark.parametrize("mode", ["train", "eval", "dual"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(backend, shape, dtype, layout, mode):
    if mode == "dual":
        first, second = make_dual_case(shape, dtype, layout, layout)
        check_dual(backend, first, second, training=True)
    else:
        check_against_reference(backend, *make_case(shape, dtype, layout), training=mode == "train",
                                momentum=0.1)


def normalized64(x, mean, var, w, b, eps=1e-5):
    """(x - mean) * invstd * w + b in float64: the exact pre-ReLU value, before rounding."""
    view = (1, -1, 1, 1)
    return ((x.double() - mean.double().view(view)) * torch.rsqrt(var.double().view(view) + eps)
            * w.double().view(view) + b.double().view(view))


# |y| below this is the kink: float32 rounding of y (~1e-6 at these magnitudes) may flip its sign.
KINK = 1e-4


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
def test_mask_bits_where_output_positive(backend, shape, dtype, layout):
    """bn_apply and bn_dual_apply: bit e of the mask (memory order of the working layout) is set
    exactly where the op's own output is > 0, and iff the pre-ReLU value y > 0 away from the
    kink; padding bits of the last byte are 0. Where a low-precision output rounds a tiny
    y > 0 to 0, the bit may say y > 0 (docs/op_layer.md: the bit is y > 0)."""
    ops = backend_ops(backend)
    x, r, w, b, _, _ = make_case(shape, dtype, layout)
    x2 = make_case(shape, dtype, layout, seed=1)[0]
    mean, var = ops.stats(x)
    mean2, var2 = ops.stats(x2)
    y_apply = normalized64(x, mean, var, w, b) + r.double()
    y_dual = normalized64(x, mean, var, w, b) + normalized64(x2, mean2, var2, w, b)
    dual = ops.dual_apply(x, mean, var, w, b, x2, mean2, var2, w, b, 1e-5, 1e-5, True)
    for (out, mask), y in ((ops.apply(x, r, mean, var, w, b, 1e-5, True), y_apply), (dual, y_dual)):
        bits = unpack_mask(mask, x.shape, working_layout(x))
        kink = y.abs() < KINK
        assert not ((bits != (out > 0)) & ~((out == 0) & kink)).any()
        assert not ((bits != (y > 0)) & ~kink).any()
        padding = mask.numel() * 8 - x.numel()  # the high bits of the last byte
        assert padding == 0 or int(mask[-1]) >> (8 - padding) == 0


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
def test_bitwise_reproducible(backend, shape, dtype, layout):
    """Two training forward+backward runs: equal outputs, gradients and running stats, bit
    for bit."""
    case = make_case(shape, dtype, layout)
    first = run_case(fused_fn(backend), *case, training=True, momentum=0.1)
    second = run_case(fused_fn(backend), *case, training=True, momentum=0.1)
    assert torch.equal(first[0], second[0])
    for key, grad in first[1].items():
        assert torch.equal(grad, second[1][key]), key
    assert torch.equal(first[2], second[2]) and torch.equal(first[3], second[3])
