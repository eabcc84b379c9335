"""dual_bn_add_relu (two BatchNorms feeding one add + ReLU) against a float64 truth under the
derived bound (tests/bounds.py), eager PyTorch held to it too, for every fused backend here,
with per-BatchNorm options that differ (eps2 != eps, momentum2 != momentum, modes); its
argument checks, its fallback where a backend has no bn_dual_apply kernel, and gradcheck."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from bounds import Norm, dual_bounds
from helpers import (
    DEVICE,
    FUSED_BACKENDS,
    assert_within_bound,
    eager_computes_as_bounded,
    is_slow,
    make_case,
    output_grad,
    relu_as,
    store_truncates,
    to64,
)

import fused_residual
from fused_residual import backends
from fused_residual.reference import dual_bn_add_relu_reference


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", FUSED_BACKENDS)


def make_dual_case(shape, dtype, layout="nchw", layout2="nchw", affine=True, seed=0):
    """(x, w, b, rm, rv) for each of the two BatchNorms; the second input in its own layout,
    with a mean offset so that its statistics differ from the first's."""
    x, _, w, b, rm, rv = make_case(shape, dtype, layout, residual=False, affine=affine, seed=seed)
    x2, _, w2, b2, rm2, rv2 = make_case(shape, dtype, layout2, residual=False, affine=affine,
                                        offset=3.0, seed=seed + 1)
    return (x, w, b, rm, rv), (x2, w2, b2, rm2, rv2)


def run_dual(fn, first, second, options, grad_seed=1, grad_dtype=None):
    """Forward + backward with `output_grad(out, grad_seed, grad_dtype)`; returns output, the
    six gradients and the four running stats."""
    leaves = []
    for x, w, b, _, _ in (first, second):
        leaves += [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, w, b)]
    stats = [t.clone() if t is not None else None for t in (first[3], first[4], second[3], second[4])]
    x, w, b, x2, w2, b2 = leaves
    out = fn(x, stats[0], stats[1], w, b, x2, stats[2], stats[3], w2, b2, **options)
    out.backward(output_grad(out, grad_seed, grad_dtype))
    names = ("grad_input", "grad_weight", "grad_bias", "grad_input2", "grad_weight2", "grad_bias2")
    return out, {n: t.grad if t is not None else None for n, t in zip(names, leaves, strict=True)}, stats


def dual_reference_with_relu_bits(bits):
    """`dual_bn_add_relu_reference` whose ReLU follows `bits` (the fused output's > 0: no
    flakes at the ReLU kink, see tests/helpers.py)."""
    def fn(x, rm, rv, w, b, x2, rm2, rv2, w2, b2, training=False, momentum=0.1, eps=1e-5,
           training2=None, momentum2=None, eps2=None):
        y = F.batch_norm(x, rm, rv, w, b, training, momentum, eps)
        y2 = F.batch_norm(x2, rm2, rv2, w2, b2, training if training2 is None else training2,
                          momentum if momentum2 is None else momentum2, eps if eps2 is None else eps2)
        return relu_as(y + y2, bits)
    return fn


def test_reference_with_relu_bits_of_its_own_output_is_the_reference():
    first, second = make_dual_case((2, 5, 4, 3), torch.float32)
    args = (first[0], first[3], first[4], first[1], first[2], second[0], second[3], second[4], second[1],
            second[2])
    want = dual_bn_add_relu_reference(*args, training=False)
    assert torch.equal(dual_reference_with_relu_bits(want > 0)(*args, training=False), want)
    assert (want == 0).any() and (want > 0).any()


def dual_norms(first, second, training=False, momentum=0.1, eps=1e-5, training2=None, momentum2=None,
               eps2=None) -> tuple[Norm, Norm]:
    """The two BatchNorms of a dual call, in float64, with the options as the op resolves them."""
    def norm(args, training, momentum, eps):
        x, w, b, rm, rv = (to64(t) for t in args)
        return Norm(x, w, b, rm, rv, training, momentum, eps)

    return (norm(first, training, momentum, eps),
            norm(second, training if training2 is None else training2,
                 momentum if momentum2 is None else momentum2, eps if eps2 is None else eps2))


def check_dual(backend, first, second, **options):
    """The fused dual op against the float64 truth under the derived bound, eager PyTorch held
    to it too (tests/helpers.py); both references take the fused output's ReLU decisions."""
    dtype = first[0].dtype

    def fused(*args, **kw):
        return fused_residual.dual_bn_add_relu(*args, **kw, backend=backend)

    got = run_dual(fused, first, second, options)
    bits = got[0].detach() > 0
    reference = dual_reference_with_relu_bits(bits)
    eager = run_dual(reference, first, second, options)
    truth = run_dual(reference, tuple(map(to64, first)), tuple(map(to64, second)), options, grad_dtype=dtype)
    dy = torch.where(bits, output_grad(got[0]).double(), torch.zeros((), dtype=torch.float64))
    param_dtype = next((t.dtype for t in (first[1], first[3]) if t is not None), None)
    bounds = dual_bounds(*dual_norms(first, second, **options), dtype, dy, param_dtype,
                         truncating_store=store_truncates(backend, dtype))
    assert got[0].dtype == dtype
    check_eager = eager_computes_as_bounded(dtype)
    assert_within_bound("output", got[0], truth[0], bounds["output"], eager[0], check_eager)
    for key, value in truth[1].items():
        if value is None:
            assert got[1][key] is None, key
            continue
        assert_within_bound(key, got[1][key], value, bounds[key], eager[1][key], check_eager)
    for i, (key, value) in enumerate(zip(("running_mean", "running_var", "running_mean2", "running_var2"),
                                         truth[2], strict=True)):
        if value is not None:  # unchanged (bound 0) where that BatchNorm is in eval
            assert_within_bound(key, got[2][i], value, bounds.get(key, 0.0), eager[2][i], check_eager)
    return got


SHAPES = [(2, 3, 5, 7), (4, 16, 7, 7), (3, 8, 1, 1), (2, 9, 6, 5)]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layouts", [("nchw", "nchw"), ("channels_last", "channels_last"),
                                     ("channels_last", "nchw"), ("strided", "channels_last")],
                         ids=lambda ls: "+".join(ls))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_matches_reference(backend, dtype, layouts, training):
    shapes = SHAPES[:2] if is_slow(backend) else SHAPES
    for shape in shapes:
        first, second = make_dual_case(shape, dtype, *layouts)
        # Per-BatchNorm options that differ: a dual op that used eps or momentum for both
        # BatchNorms is off by ~1e-3 relative (eps2 - eps over twice the variance, ~4).
        got = check_dual(backend, first, second, training=training, momentum2=0.3, eps2=1e-2)
        # The output is in the first input's working layout.
        fmt = torch.channels_last if layouts[0] == "channels_last" else torch.contiguous_format
        assert got[0].is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
def test_options(backend, affine):
    """Per-BatchNorm options: modes, momenta and eps that differ, no running stats on one."""
    first, second = make_dual_case((3, 6, 5, 4), torch.float32, affine=affine)
    check_dual(backend, first, second, training=True, momentum=0.3, eps=1e-3, momentum2=0.05,
               eps2=1e-4)
    check_dual(backend, first, second, training=False, training2=True)
    check_dual(backend, first, second, training=True, training2=False, eps2=1e-2)
    no_stats = (*second[:3], None, None)
    check_dual(backend, first, no_stats, training=True)


def test_float64(backend):
    first, second = make_dual_case((2, 5, 4, 3), torch.float64, "channels_last", "nchw")
    for training in (True, False):
        check_dual(backend, first, second, training=training)


def test_gradcheck_float64(backend):
    # Under the interpreter every one of gradcheck's ~2·numel forwards is slow: fewer values.
    first, second = make_dual_case((2, 2, 2, 1) if is_slow(backend) else (2, 3, 3, 2), torch.float64)
    for training in (True,) if is_slow(backend) else (True, False):
        inputs = tuple(t.detach().clone().requires_grad_(True)
                       for t in (first[0], first[1], first[2], second[0], second[1], second[2]))

        def fn(x, w, b, x2, w2, b2, training=training):
            return fused_residual.dual_bn_add_relu(
                x, first[3].clone(), first[4].clone(), w, b, x2, second[3].clone(), second[4].clone(),
                w2, b2, training, backend=backend)

        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5)


def test_inference_matches_training_graph(backend):
    """Under no_grad the forward skips the mask, and gives the same values and stats."""
    first, second = make_dual_case((2, 4, 5, 5), torch.float32)
    x, w, b, rm, rv = first
    x2, w2, b2, rm2, rv2 = second
    stats = [t.clone() for t in (rm, rv, rm2, rv2)]
    with torch.no_grad():
        a = fused_residual.dual_bn_add_relu(x, rm, rv, w, b, x2, rm2, rv2, w2, b2, True, backend=backend)
    out = fused_residual.dual_bn_add_relu(x, stats[0], stats[1], w.clone().requires_grad_(), b, x2,
                                          stats[2], stats[3], w2, b2, True, backend=backend)
    assert torch.equal(a, out.detach())
    for s, t in zip((rm, rv, rm2, rv2), stats, strict=True):
        assert torch.equal(s, t)


def test_empty_batch(backend):
    x = torch.randn(0, 3, 4, 4, device=DEVICE)
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    w = torch.ones(3, device=DEVICE, requires_grad=True)
    out = fused_residual.dual_bn_add_relu(x, rm, rv, w, None, torch.randn_like(x), rm, rv, w, None,
                                          True, backend=backend)
    assert out.shape == x.shape
    out.sum().backward()
    assert torch.equal(rm, torch.zeros(3, device=DEVICE))
    assert torch.equal(w.grad, torch.zeros(3, device=DEVICE))


def test_split_fallback_without_dual_kernel(backend, monkeypatch):
    """A backend without a bn_dual_apply kernel for the device runs the second BatchNorm
    unfused and the single-BatchNorm op: the same values under the rule."""
    monkeypatch.setattr(backends, "dual_apply_served", lambda name, device_type: False)
    import fused_residual.functional as functional

    monkeypatch.setattr(functional, "dual_apply_served", lambda name, device_type: False)
    calls = []
    monkeypatch.setattr(functional, "FusedDualBatchNormAddReLU",
                        type("Spy", (), {"apply": staticmethod(lambda *a: calls.append(a))}))
    first, second = make_dual_case((2, 4, 3, 3), torch.float32)
    check_dual(backend, first, second, training=True)
    assert calls == []


def test_dual_apply_served():
    assert backends.dual_apply_served("reference", "cpu")
    if "extension" in fused_residual.available_backends("cpu"):
        assert backends.dual_apply_served("extension", "cpu")


@pytest.mark.parametrize(
    "change, error, words",
    [
        (dict(input2=torch.randn(2, 3, 4, 5)), ValueError, "input2 shape"),
        (dict(input2=torch.randn(2, 3, 4, 4, dtype=torch.float64)), TypeError, "input2 dtype"),
        (dict(input2=None), TypeError, "input2 must be a Tensor"),
        (dict(weight2=torch.ones(4)), ValueError, "weight2"),
        (dict(running_mean2=torch.zeros(2)), ValueError, "running_mean2"),
        (dict(running_var2=None), ValueError, "running_mean2 and running_var2"),
        (dict(bias=torch.ones(5)), ValueError, "bias must"),
        (dict(eps2=0.0), ValueError, "eps2 must be positive"),
    ],
)
@pytest.mark.parametrize("backend_name", [*FUSED_BACKENDS, "reference", "auto"])
def test_bad_arguments(backend_name, change, error, words):
    x = torch.randn(2, 3, 4, 4, device=DEVICE)
    kwargs = dict(input=x, running_mean=torch.zeros(3), running_var=torch.ones(3), weight=None, bias=None,
                  input2=torch.randn_like(x), running_mean2=torch.zeros(3), running_var2=torch.ones(3),
                  training=True)
    kwargs.update(change)
    kwargs = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) and v.dim() == 1 else v
              for k, v in kwargs.items()}
    with pytest.raises(error, match=words):
        fused_residual.dual_bn_add_relu(**kwargs, backend=backend_name)
