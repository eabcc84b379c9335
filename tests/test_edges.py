"""Edges as nn.BatchNorm2d has them (issue 23, item 5), in every backend, for the module and
the functional forms, against nn.BatchNorm2d (+ add + ReLU) itself:

- special values: +-inf and NaN in the input or the residual give the same outputs and the
  same running statistics in training and eval (where nn's statistic is +-inf or NaN, ours is
  the same one; finite values against float64 within the bound derived from the computation,
  tests/bounds.py);
- dtypes: every combination of input and per-channel dtypes is accepted or refused exactly
  where nn.BatchNorm2d / F.batch_norm accepts or refuses it here, with the same output dtype,
  under autocast too;
- errors: for every input nn refuses, the fused error is an instance of nn's exception class
  (tests/test_errors.py);
- the differences kept on purpose (docs/op_layer.md, "Differences from nn.BatchNorm2d") hold as
  documented.
"""

from __future__ import annotations

import copy
import functools
import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from bounds import Norm, bn_add_relu_bounds, dual_bounds
from helpers import (
    DEVICE,
    FUSED_BACKENDS,
    assert_within_bound,
    batch_norm_call,
    eager_computes_as_bounded,
    store_truncates,
)

import fused_residual
from fused_residual.checks import DtypeError, ShapeError

INF, NAN = float("inf"), float("nan")
BACKENDS = [*FUSED_BACKENDS, "reference"]
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Special values written into channel 0 of the input (channel 1 stays finite): position ->
# value. x[0, 0, 0, 0] is the Triton and CUDA kernels' per-channel shift.
SPECIALS = {
    "+inf": {(1, 0, 2, 3): INF},
    "-inf": {(2, 0, 1, 4): -INF},
    "nan": {(0, 0, 3, 1): NAN},
    "+inf and -inf": {(0, 0, 1, 2): INF, (2, 0, 3, 4): -INF},
    "+inf at x[0, c, 0, 0]": {(0, 0, 0, 0): INF},
    "-inf last": {(-1, 0, -1, -1): -INF},
    "nan and +inf": {(1, 0, 0, 0): NAN, (0, 0, 2, 2): INF},
}


def same_specials(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    """NaN, +inf and -inf exactly where nn has them."""
    for what, mask in (("NaN", torch.isnan), ("+inf", lambda t: t == INF), ("-inf", lambda t: t == -INF)):
        g, w = mask(got.double()), mask(want.double())
        assert torch.equal(g, w), (f"{name}: {what} at {g.nonzero().tolist()}, nn has it at "
                                   f"{w.nonzero().tolist()}")


def check_like_nn(backend: str, name: str, got: torch.Tensor, want: torch.Tensor, truth: torch.Tensor,
                  bound, dtype: torch.dtype) -> None:
    """nn's specials and dtype; finite values within the derived bound of the float64 truth
    (nn's own held to it too where it computes as the bound assumes, float32 and float64).
    The reference backend is eager PyTorch: in float16/bfloat16, where eager rounds its
    intermediates (the bound's assumption does not hold), it must give nn's values exactly."""
    same_specials(name, got, want)
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype}, nn gives {want.dtype}"
    if backend == "reference" and not eager_computes_as_bounded(dtype):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{name}: {m}")
        return
    assert_within_bound(name, got, truth, bound, want, eager_computes_as_bounded(dtype))


def special_case(shape, dtype, layout, where, values, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    r = torch.randn(shape, generator=g, dtype=torch.float64)
    target = x if where == "input" else r
    for pos, v in values.items():
        target[pos] = v
    x, r = x.to(DEVICE, dtype), r.to(DEVICE, dtype)
    if layout == "channels_last":
        x, r = (t.contiguous(memory_format=torch.channels_last) for t in (x, r))
    return x, r


def _param_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _eager_module(c, pdtype, training):
    """nn.BatchNorm2d with weight/bias/statistics away from 1/0."""
    bn = nn.BatchNorm2d(c, device=DEVICE, dtype=pdtype).train(training)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.5, 0.75]))
        bn.bias.copy_(torch.tensor([0.25, -0.5]))
        bn.running_mean.copy_(torch.tensor([0.1, -0.2]))
        bn.running_var.copy_(torch.tensor([0.8, 1.3]))
    return bn


def _run_module(backend, bn, x, r):
    fused = fused_residual.BatchNormAddReLU2d(bn.num_features, backend=backend, device=DEVICE,
                                              dtype=bn.weight.dtype).train(bn.training)
    fused.load_state_dict(bn.state_dict())
    return fused(x, r), fused


def _run_functional(backend, bn, x, r):
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    out = fused_residual.bn_add_relu(x, r, rm, rv, bn.weight, bn.bias, bn.training, 0.1, bn.eps,
                                     backend=backend)
    return out, (rm, rv)


def _run_dual(backend, bn, x, r):
    """The two-BatchNorm tail, the second BatchNorm's input being the residual."""
    state = [bn.running_mean.clone(), bn.running_var.clone(), bn.running_mean.clone(), bn.running_var.clone()]
    out = fused_residual.dual_bn_add_relu(x, state[0], state[1], bn.weight, bn.bias, r, state[2], state[3],
                                          bn.weight, bn.bias, bn.training, 0.1, bn.eps, backend=backend)
    return out, state


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("form", ["module", "functional", "dual"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_special_values_as_nn(backend, form, training, layout):
    """Outputs and running statistics as nn.BatchNorm2d + add + ReLU's (dual: two BatchNorms,
    the second one's input being the residual): every SPECIALS case in a float32 input, the
    statistics' cases in a float16 input (float32 statistics), the element-wise cases in the
    residual."""
    shape = (3, 2, 4, 5)
    cases = [*((torch.float32, "input", case) for case in SPECIALS.items()),
             *((torch.float16, "input", case) for case in SPECIALS.items()
               if case[0] in ("+inf", "nan", "+inf and -inf", "+inf at x[0, c, 0, 0]")),
             *((torch.float32, "residual", case) for case in SPECIALS.items()
               if case[0] in ("+inf", "-inf", "nan"))]
    for dtype, where, (label, values) in cases:
        name = f"{form} {label} in the {where}, {dtype}"
        x, r = special_case(shape, dtype, layout, where, values)
        bn = _eager_module(2, _param_dtype(dtype), training)
        truth_bn = _eager_module(2, torch.float64, training)
        bounds = _special_bounds(backend, form, bn, x, r)
        run = {"module": _run_module, "functional": _run_functional, "dual": _run_dual}[form]
        got, state = run(backend, bn, x, r)
        if form == "dual":
            bn2, truth_bn2 = _eager_module(2, _param_dtype(dtype), training), _eager_module(2, torch.float64,
                                                                                            training)
            want = F.relu(bn(x) + bn2(r))
            truth = F.relu(truth_bn(x.double()) + truth_bn2(r.double()))
            stats = [(state[0], bn.running_mean, truth_bn.running_mean), (state[1], bn.running_var,
                                                                           truth_bn.running_var),
                     (state[2], bn2.running_mean, truth_bn2.running_mean),
                     (state[3], bn2.running_var, truth_bn2.running_var)]
        else:
            want = F.relu(bn(x) + r)
            truth = F.relu(truth_bn(x.double()) + r.double())
            rm, rv = (state.running_mean, state.running_var) if form == "module" else state
            stats = [(rm, bn.running_mean, truth_bn.running_mean), (rv, bn.running_var, truth_bn.running_var)]
        check_like_nn(backend, f"{name}: output", got, want, truth, bounds["output"], dtype)
        for i, (g, w, t) in enumerate(stats):
            key = ("running_mean", "running_var")[i % 2] + ("2" if i >= 2 else "")
            check_like_nn(backend, f"{name}: running statistic {i}", g, w, t, bounds.get(key, 0.0), w.dtype)


def _special_bounds(backend, form, bn, x, r) -> dict:
    """Derived bounds of a special-values case's output and running statistics (unchanged in
    eval: bound 0), from bn's state before the call; dual: the same BatchNorm twice, the
    residual its second input."""
    call = batch_norm_call(bn)
    options = dict(param_dtype=bn.weight.dtype, truncating_store=store_truncates(backend, x.dtype))
    if form != "dual":
        return bn_add_relu_bounds(x, r, *call.values(), **options)
    first, second = (Norm(t.double(), *call.values()) for t in (x, r))
    return dual_bounds(first, second, x.dtype, **options)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_special_values_statistics_in_larger_batches(backend, layout):
    """The statistics kernels over many values per lane and several programs or blocks per
    channel: +inf, -inf, NaN and both infinities anywhere give nn's running statistics."""
    shape = (6, 3, 16, 16)
    cases = [{(0, 1, 0, 0): INF}, {(5, 1, 15, 15): -INF}, {(2, 1, 7, 9): NAN},
             {(0, 1, 0, 0): -INF, (4, 1, 3, 3): INF}, {(3, 1, 8, 8): INF, (3, 1, 8, 9): INF}]
    for values in cases:
        x, _ = special_case(shape, torch.float32, layout, "input", values)
        rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
        F.batch_norm(x, rm, rv, training=True)
        got_rm, got_rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
        out = fused_residual.bn_add_relu(x, None, got_rm, got_rv, training=True, backend=backend)
        name = f"{values}"
        same_specials(f"{name}: running_mean", got_rm, rm)
        same_specials(f"{name}: running_var", got_rv, rv)
        assert torch.isnan(out[:, 1]).all(), name  # var is NaN: the whole channel is
        torch.testing.assert_close(got_rm[[0, 2]], rm[[0, 2]], rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------
# Dtypes
# --------------------------------------------------------------------------------------


def _outcome(fn):
    try:
        return fn(), None
    except Exception as exc:  # the exception is the subject of the test
        return None, exc


def _assert_same_outcome(name, got, want):
    (out, err), (nn_out, nn_err) = got, want
    if nn_err is None:
        assert err is None, f"{name}: nn accepts it, the fused form raises {err!r}"
        assert out.dtype == nn_out.dtype, f"{name}: output {out.dtype}, nn's {nn_out.dtype}"
    else:
        assert err is not None, f"{name}: nn refuses it ({nn_err!r}), the fused form accepts it"
        assert isinstance(err, type(nn_err)), f"{name}: {err!r} is not a {type(nn_err).__name__} like nn's"


def _per_channel_args(dtypes, c=3):
    """(running_mean, running_var, weight, bias) of the given dtypes (None: absent)."""
    sd, wd, bd = dtypes
    values = ((sd, 0.0), (sd, 1.0), (wd, 1.5), (bd, 0.5))
    return [None if d is None else torch.full((c,), v, dtype=d, device=DEVICE) for d, v in values]


def _nn_call(x, dtypes, training):
    return F.relu(F.batch_norm(x, *_per_channel_args(dtypes), training=training))


def _fused_call(x, dtypes, training):
    return fused_residual.bn_add_relu(x, None, *_per_channel_args(dtypes), training=training)


def test_functional_dtype_combinations_as_nn():
    """Input dtype x (statistics, weight, bias) dtypes or None, train and eval: accepted or
    refused as F.batch_norm does here, with nn's exception class and output dtype."""
    checked = 0
    for training, xd in itertools.product((True, False), FLOATS):
        x = torch.randn(2, 3, 4, 4, device=DEVICE).to(xd)
        for dtypes in itertools.product((*FLOATS, None), repeat=3):
            if dtypes[0] is None and not training:
                continue
            name = f"input {xd}, (statistics, weight, bias) {dtypes}, training={training}"
            want = _outcome(functools.partial(_nn_call, x, dtypes, training))
            got = _outcome(functools.partial(_fused_call, x, dtypes, training))
            _assert_same_outcome(name, got, want)
            checked += 1
    assert checked == 2 * 4 * 125 - 4 * 25


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_module_dtype_combinations_as_nn(backend, training):
    """A module of each dtype fed an input of each dtype, with and without running statistics
    or affine parameters: nn.BatchNorm2d's acceptance, exception class and output dtype; and
    where both accept, the same values."""
    for pd, xd, kwargs in itertools.product(FLOATS, FLOATS, (dict(), dict(affine=False),
                                                             dict(track_running_stats=False))):
        nn_bn = nn.BatchNorm2d(3, device=DEVICE, dtype=pd, **kwargs).train(training)
        truth_bn = copy.deepcopy(nn_bn).double()
        call = batch_norm_call(nn_bn)
        fused = fused_residual.BatchNormAddReLU2d(3, device=DEVICE, dtype=pd, backend=backend,
                                                  **kwargs).train(training)
        x = torch.randn(2, 3, 4, 4, device=DEVICE).to(xd)
        name = f"{pd} module, {xd} input, {kwargs}, training={training}"
        want = _outcome(functools.partial(nn_bn, x))
        got = _outcome(functools.partial(fused, x))
        _assert_same_outcome(name, got, want)
        if want[1] is None:
            bound = bn_add_relu_bounds(x, None, *call.values(), param_dtype=pd,
                                       truncating_store=store_truncates(backend, xd))["output"]
            check_like_nn(backend, name, got[0], F.relu(want[0]), F.relu(truth_bn(x.double())), bound, xd)


def test_autocast_keeps_working():
    """Under CPU/CUDA autocast a conv feeds a float32 BatchNorm a low-precision input, which
    nn takes: so does the fused module, with nn's output dtype."""
    dtype = torch.bfloat16 if DEVICE == "cpu" else torch.float16
    conv = nn.Conv2d(3, 4, 3, padding=1, device=DEVICE)
    nn_bn = nn.BatchNorm2d(4, device=DEVICE)
    fused = fused_residual.BatchNormAddReLU2d(4, device=DEVICE)
    x = torch.randn(2, 3, 8, 8, device=DEVICE)
    with torch.autocast(DEVICE, dtype=dtype):
        y = conv(x)
        want, got = F.relu(nn_bn(y) + y), fused(y, y)
    assert y.dtype == dtype and got.dtype == want.dtype == dtype
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(fused.running_mean, nn_bn.running_mean)


def test_nn_dtype_rule_is_asked_outside_tracing():
    """The first call with a new dtype combination asks F.batch_norm on real tensors, also when
    it happens inside torch.export tracing (fake tensors), and leaves no trace in the graph."""
    from fused_residual import checks

    checks._NN_REFUSALS.clear()
    bn = fused_residual.BatchNormAddReLU2d(3, dtype=torch.float64, device=DEVICE).eval()
    ok = torch.export.export(bn, (torch.randn(2, 3, 4, 4, dtype=torch.float64, device=DEVICE),))
    assert not checks._NN_REFUSALS  # same dtypes: nothing asked
    half = torch.randn(2, 3, 4, 4, device=DEVICE).half()
    bn32 = fused_residual.BatchNormAddReLU2d(3, device=DEVICE).eval()
    program = torch.export.export(bn32, (half,))
    assert len(checks._NN_REFUSALS) == 1
    assert "batch_norm" not in program.graph_module.code
    with pytest.raises(DtypeError, match=r"refuses input dtype torch\.float64"):
        torch.export.export(bn32, (half.double(),))
    assert ok.module()(torch.ones(2, 3, 4, 4, dtype=torch.float64, device=DEVICE)).dtype == torch.float64


# --------------------------------------------------------------------------------------
# Differences kept on purpose: each row of docs/op_layer.md's table, as documented.
# --------------------------------------------------------------------------------------


def test_documented_differences():
    x = torch.randn(2, 3, 4, 4, device=DEVICE)
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    # Functional input other than 4-D: F.batch_norm takes (N, C), (N, C, L), (N, C, D, H, W).
    for shape in ((2, 3), (2, 3, 4), (2, 3, 2, 2, 2)):
        y = torch.randn(shape, device=DEVICE)
        F.batch_norm(y, rm.clone(), rv.clone(), training=True)
        with pytest.raises(ValueError, match="4-D"):
            fused_residual.bn_add_relu(y, None, rm.clone(), rv.clone(), training=True)
    # A residual that broadcasts: nn adds it, the fused op needs the input's shape.
    F.relu(F.batch_norm(x, rm.clone(), rv.clone(), training=True) + x[:1])
    with pytest.raises(ShapeError, match="residual shape"):
        fused_residual.bn_add_relu(x, x[:1], rm.clone(), rv.clone(), training=True)
    # A residual of another dtype: nn promotes, the functional form refuses, the module casts
    # it to the input's dtype (as a block's in-place `out += identity`).
    r64 = x.double()
    assert (F.batch_norm(x, rm.clone(), rv.clone(), training=True) + r64).dtype == torch.float64
    with pytest.raises(TypeError, match="residual dtype"):
        fused_residual.bn_add_relu(x, r64, rm.clone(), rv.clone(), training=True)
    assert fused_residual.BatchNormAddReLU2d(3, device=DEVICE)(x, r64).dtype == torch.float32
    # While exporting, the functional forms are nn's composition: a broadcast residual is taken.
    with fused_residual.unfused():
        out = fused_residual.bn_add_relu(x, x[:1], rm.clone(), rv.clone(), training=True)
    torch.testing.assert_close(out, F.relu(F.batch_norm(x, rm.clone(), rv.clone(), training=True) + x[:1]))


@pytest.mark.skipif(DEVICE != "cpu", reason="nn's float32 sum of bfloat16 is its CPU kernel's")
@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_statistics_do_not_overflow(backend):
    """Documented difference: bfloat16 values near float32's maximum. nn's CPU statistics sum
    them in float32 and overflow; the fused ones stay finite (and right)."""
    x = torch.full((2, 1, 2, 2), 3e38, device=DEVICE).bfloat16()
    rm, rv = torch.zeros(1, device=DEVICE), torch.ones(1, device=DEVICE)
    F.batch_norm(x, rm, rv, training=True)
    assert torch.isinf(rm).all() and torch.isinf(rv).all()
    got_rm, got_rv = torch.zeros(1, device=DEVICE), torch.ones(1, device=DEVICE)
    fused_residual.bn_add_relu(x, None, got_rm, got_rv, training=True, backend=backend)
    if backend == "reference":  # the reference is nn itself
        assert torch.isinf(got_rm).all()
        return
    torch.testing.assert_close(got_rm, 0.1 * x.float()[0, :, 0, 0])
    torch.testing.assert_close(got_rv, torch.full_like(got_rv, 0.9))


def test_frozen_twin_takes_the_batch_norm_dtype_rule():
    """Documented difference: FrozenBatchNorm2d promotes a float64 input over float32 buffers;
    its fused twin refuses it as F.batch_norm does."""
    tv_ops = pytest.importorskip("torchvision.ops")
    from fused_residual._torchvision import FrozenBatchNormAddReLU2d

    x = torch.randn(2, 3, 4, 4, device=DEVICE, dtype=torch.float64)
    assert tv_ops.FrozenBatchNorm2d(3).to(DEVICE)(x).dtype == torch.float64
    with pytest.raises(DtypeError):
        FrozenBatchNormAddReLU2d(3).to(DEVICE)(x)
