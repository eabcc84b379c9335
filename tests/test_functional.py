"""bn_add_relu against eager PyTorch and a float64 truth, for every fused backend here."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    DEVICE,
    FUSED_BACKENDS,
    check_against_reference,
    fused_fn,
    is_slow,
    make_case,
    reference_fn,
    reference_with_relu_bits,
    run_case,
)

import fused_residual

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LAYOUTS = ["nchw", "channels_last", "strided"]
# N=1, C=1, odd C, 1x1 and 7x7 spatial, odd element counts (mask padding), a stage shape.
SHAPES = [(2, 3, 5, 7), (1, 1, 3, 3), (1, 5, 2, 1), (4, 7, 1, 1), (3, 16, 7, 7), (2, 9, 6, 5)]
LARGE_SHAPES = [(4, 64, 28, 28), (8, 256, 7, 7), (2, 32, 56, 56)]


def shapes_for(backend):
    return SHAPES[:4] if is_slow(backend) else SHAPES + LARGE_SHAPES


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", FUSED_BACKENDS)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(backend, dtype, layout, training):
    for shape in shapes_for(backend):
        if training and shape[0] * shape[2] * shape[3] == 1:
            continue
        case = make_case(shape, dtype, layout)
        check_against_reference(backend, *case, training=training, momentum=0.1)


@pytest.mark.parametrize("residual", [True, False], ids=["add", "noadd"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("momentum", [0.1, 0.0, 1.0])
def test_options(backend, residual, affine, momentum):
    for training in (True, False):
        case = make_case((3, 6, 5, 4), torch.float32, residual=residual, affine=affine)
        check_against_reference(backend, *case, training=training, momentum=momentum)


def test_float64(backend):
    case = make_case((2, 5, 4, 3), torch.float64, "channels_last")
    for training in (True, False):
        check_against_reference(backend, *case, training=training, momentum=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_mean_offset(backend, dtype):
    """A mean of 1e4. float32: a spread of ~2, where E[x^2]-E[x]^2 would lose every digit of
    the variance. bfloat16 (8 significant bits: values 64 apart at 1e4): a spread of ~500,
    which survives the rounding (the variance is not 0), with kappa = 1e4 / 500 = 20.
    Few values per channel (4x3x3 = 36): the derived bound of a mean of n values of 1e4 in
    float32 grows with n (any summation order, tests/bounds.py) and is meaningful here."""
    shape = (4, 8, 3, 3)
    spread = 500.0 if dtype == torch.bfloat16 else 2.0
    for layout in ("nchw", "channels_last"):
        case = make_case(shape, dtype, layout, offset=1e4, spread=spread)
        variance = case[0].double().var(dim=(0, 2, 3))
        assert variance.min() > (spread / 2) ** 2, variance  # the spread survived the rounding
        check_against_reference(backend, *case, training=True, momentum=0.1)


def test_no_running_stats(backend):
    """track_running_stats=False: batch statistics, nothing to update."""
    x, r, w, b, _, _ = make_case((3, 4, 5, 5), torch.float32)
    check_against_reference(backend, x, r, w, b, None, None, training=True, momentum=0.1)


def test_gradcheck_float64(backend):
    x, r, w, b, rm, rv = make_case((2, 3, 3, 2), torch.float64)
    for training in (True, False):
        inputs = tuple(t.detach().clone().requires_grad_(True) for t in (x, r, w, b))

        def fn(x, r, w, b, training=training):
            # Fresh running stats per call: the function must be pure for gradcheck.
            return fused_residual.bn_add_relu(x, r, rm.clone(), rv.clone(), w, b, training, 0.1,
                                              1e-5, backend=backend)

        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5)


def test_reference_with_relu_bits_of_its_own_output_is_the_reference():
    x, r, w, b, rm, rv = make_case((2, 5, 4, 3), torch.float32)
    want = reference_fn(x, r, rm, rv, w, b, False, 0.1)
    assert torch.equal(reference_with_relu_bits(want > 0)(x, r, rm, rv, w, b, False, 0.1), want)
    assert (want == 0).any() and (want > 0).any()


def test_only_some_inputs_need_grad(backend):
    """Asking for one gradient gives the one that the same backend computes with all of them
    asked for (other kernel variants, the same mask)."""
    x, r, w, b, rm, rv = make_case((2, 4, 3, 3), torch.float32)
    ref = run_case(fused_fn(backend), x, r, w, b, rm, rv, True, 0.1)
    for which in ("input", "residual", "weight"):
        xs = x.detach().clone().requires_grad_(which == "input")
        rs = r.detach().clone().requires_grad_(which == "residual")
        ws = w.detach().clone().requires_grad_(which == "weight")
        out = fused_residual.bn_add_relu(xs, rs, rm.clone(), rv.clone(), ws, b, True, backend=backend)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
        got = {"input": xs.grad, "residual": rs.grad, "weight": ws.grad}[which]
        torch.testing.assert_close(got, ref[1][f"grad_{which}"])


def test_inference_matches_training_graph(backend):
    """Under no_grad the forward skips the mask, and gives the same values and stats."""
    x, r, w, b, rm, rv = make_case((2, 4, 5, 5), torch.float32)
    rm2, rv2 = rm.clone(), rv.clone()
    with torch.no_grad():
        a = fused_residual.bn_add_relu(x, r, rm, rv, w, b, True, backend=backend)
    b2 = fused_residual.bn_add_relu(x, r, rm2, rv2, w.requires_grad_(), b, True, backend=backend)
    assert torch.equal(a, b2.detach())
    assert torch.equal(rm, rm2) and torch.equal(rv, rv2)


def test_output_keeps_memory_format(backend):
    x, r, w, b, rm, rv = make_case((2, 8, 3, 3), torch.float32, "channels_last")
    out = fused_residual.bn_add_relu(x, r, rm, rv, w, b, True, backend=backend)
    assert out.is_contiguous(memory_format=torch.channels_last)
    x, r, w, b, rm, rv = make_case((2, 8, 3, 3), torch.float32, "nchw")
    assert fused_residual.bn_add_relu(x, r, rm, rv, w, b, True, backend=backend).is_contiguous()


@pytest.mark.smoke
def test_nan_and_inf_propagate(backend):
    x, r, w, b, rm, rv = make_case((2, 3, 4, 4), torch.float32)
    x = x.clone()
    x[0, 0, 0, 0] = float("nan")
    r = r.clone()
    r[1, 1, 2, 2] = float("inf")
    r[1, 2, 0, 0] = float("-inf")
    for training in (True, False):
        ref = fused_fn("reference")(x, r, rm.clone(), rv.clone(), w, b, training, 0.1)
        got = fused_fn(backend)(x, r, rm.clone(), rv.clone(), w, b, training, 0.1)
        torch.testing.assert_close(got, ref, equal_nan=True, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_denormals_as_pytorch(backend, dtype):
    """Subnormal inputs, residuals and gradients survive, as in PyTorch (no flush to zero):
    an eval-mode BatchNorm that is the identity (mean 0, var 1, no affine; eps 1e-30, which
    var + eps rounds away, since torch 2.11 refuses eps 0) makes every operation exact, so the
    fused results equal eager PyTorch's bit for bit."""
    if is_slow(backend) and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter converts bfloat16 subnormals wrongly (its bit-level bf16 <-> fp32 "
                    "conversion: 1.47e-39 -> 0); compiled kernels convert exactly, and test_gpu_static.py "
                    "checks their PTX for flush-to-zero")
    tiny = torch.finfo(dtype).smallest_normal
    g = torch.Generator().manual_seed(0)

    def subnormals(shape):
        return (torch.randint(-6, 7, shape, generator=g) * (tiny / 8)).to(dtype).to(DEVICE)

    x, r, grad = subnormals((2, 3, 4, 5)), subnormals((2, 3, 4, 5)), subnormals((2, 3, 4, 5))
    assert ((x != 0) & (x.abs() < tiny)).any()
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    results = []
    for fn in (fused_fn(backend), reference_fn):
        xs, rs = x.clone().requires_grad_(True), r.clone().requires_grad_(True)
        out = fn(xs, rs, rm, rv, None, None, False, 0.1, eps=1e-30)
        out.backward(grad)
        results.append((out, xs.grad, rs.grad))
    for name, got, want in zip(("output", "grad_input", "grad_residual"), *results, strict=True):
        assert torch.equal(got, want), name
        assert ((got != 0) & (got.abs() < tiny)).any(), f"{name}: no subnormal left to compare"


def test_empty_batch(backend):
    x = torch.randn(0, 3, 4, 4, device=DEVICE)
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    w = torch.ones(3, device=DEVICE, requires_grad=True)
    out = fused_residual.bn_add_relu(x, torch.randn_like(x), rm, rv, w, None, True, backend=backend)
    assert out.shape == x.shape
    out.sum().backward()
    assert torch.equal(rm, torch.zeros(3, device=DEVICE)) and torch.equal(rv, torch.ones(3, device=DEVICE))
    assert torch.equal(w.grad, torch.zeros(3, device=DEVICE))


def test_deterministic(backend):
    x, r, w, b, rm, rv = make_case((4, 8, 6, 6), torch.float32, "channels_last")
    first = run_case(fused_fn(backend), x, r, w, b, rm, rv, True, 0.1)
    second = run_case(fused_fn(backend), x, r, w, b, rm, rv, True, 0.1)
    assert torch.equal(first[0], second[0])
    for key, value in first[1].items():
        assert torch.equal(value, second[1][key]), key
    assert torch.equal(first[2], second[2]) and torch.equal(first[3], second[3])


def test_saved_bytes_within_budget(backend):
    """Saved for backward: input + 1-bit mask + per-channel vectors, <= 1.07x the input."""
    for dtype in (torch.float32, torch.bfloat16):
        x, r, w, b, rm, rv = make_case((4, 32, 16, 16), dtype, "channels_last")
        x.requires_grad_(True)
        storages: dict[int, int] = {}

        def pack(t, storages=storages):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fused_residual.bn_add_relu(x, r, rm, rv, w, b, True, backend=backend)
        ratio = sum(storages.values()) / (x.numel() * x.element_size())
        assert ratio <= 1.07, f"{dtype}: saved {ratio:.3f}x the input's bytes"


@pytest.mark.skipif(not any(is_slow(b) for b in FUSED_BACKENDS), reason="no interpreted Triton here")
def test_interpreted_triton_stores_bfloat16_by_truncation():
    """What `helpers.store_truncates` allows for, pinned: Triton's interpreter converts float32
    to bfloat16 toward zero (compiled kernels round to nearest), float16 to nearest. When the
    interpreter rounds to nearest, this fails: drop the allowance (bounds get 2x tighter)."""
    import triton
    import triton.language as tl

    @triton.jit
    def store(x_ptr, y_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, tl.load(x_ptr + offs).to(y_ptr.dtype.element_ty))

    x = torch.tensor([2.18655, -2.18655, 1 + 2**-8 + 2**-12, 3.99], dtype=torch.float32)
    y = torch.empty(4, dtype=torch.bfloat16)
    store[(1,)](x, y, BLOCK=4)
    toward_zero = (x.view(torch.int32) & -(1 << 16)).view(torch.float32).to(torch.bfloat16)  # high 16 bits
    assert torch.equal(y, toward_zero) and not torch.equal(y, x.to(torch.bfloat16)), y
    y = torch.empty(4, dtype=torch.float16)
    store[(1,)](x, y, BLOCK=4)
    assert torch.equal(y, x.to(torch.float16)), y  # to nearest
