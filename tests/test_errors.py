"""Bad input: a clear Python exception naming the problem, never a crash or a wrong answer; and
for every input nn.BatchNorm2d (+ add + ReLU) refuses, an error of nn's class (issue 23)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import DEVICE, FUSED_BACKENDS

import fused_residual
from fused_residual.checks import DeviceError, DtypeError, ShapeError, UnsupportedDtypeError


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", [*FUSED_BACKENDS, "reference", "auto"])


def args(shape=(2, 3, 4, 4), dtype=torch.float32):
    c = shape[1]
    x = torch.randn(shape, device=DEVICE, dtype=dtype)
    return dict(input=x, residual=torch.randn_like(x), running_mean=torch.zeros(c, device=DEVICE),
                running_var=torch.ones(c, device=DEVICE), weight=torch.ones(c, device=DEVICE),
                bias=torch.zeros(c, device=DEVICE))


def call(backend, training=True, **kwargs):
    return fused_residual.bn_add_relu(training=training, backend=backend, **kwargs)


@pytest.mark.parametrize(
    "change, error, words",
    [
        (dict(input=torch.randn(2, 3, 4)), ValueError, "4-D"),
        (dict(input=torch.randn(2, 3, 4, 4, 1)), ValueError, "4-D"),
        (dict(input=torch.randint(0, 5, (2, 3, 4, 4))), TypeError, "dtype"),
        (dict(input=torch.ones(2, 3, 4, 4, dtype=torch.bool)), TypeError, "dtype"),
        (dict(residual=torch.randn(2, 3, 4, 5)), ValueError, "residual shape"),
        (dict(residual=torch.randn(2, 3, 4, 4, dtype=torch.float64)), TypeError, "residual dtype"),
        (dict(weight=torch.ones(4)), ValueError, "weight"),
        (dict(bias=torch.ones(2)), ValueError, "bias"),
        (dict(running_mean=torch.zeros(4)), ValueError, "running_mean"),
        (dict(running_var=torch.ones(3, 1)), ValueError, "running_var"),
        (dict(weight=torch.ones(3, dtype=torch.int64)), TypeError, "weight"),
        (dict(running_var=None), ValueError, "running_mean and running_var"),
    ],
)
def test_bad_arguments(backend, change, error, words):
    kwargs = args()
    kwargs.update({k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in change.items()})
    with pytest.raises(error, match=words):
        call(backend, **kwargs)


def test_eval_needs_running_stats(backend):
    kwargs = args()
    kwargs.update(running_mean=None, running_var=None)
    with pytest.raises(ValueError, match="evaluation mode"):
        call(backend, training=False, **kwargs)


@pytest.mark.parametrize("shape", [(1, 3, 1, 1), (1, 1, 1, 1)])
def test_one_value_per_channel_in_training(backend, shape):
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        call(backend, **args(shape))
    bn = fused_residual.BatchNormAddReLU2d(shape[1], backend=backend).to(DEVICE)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(torch.randn(shape, device=DEVICE))
    # Eval mode with one value per channel is fine, as for nn.BatchNorm2d.
    bn.eval()
    assert bn(torch.randn(shape, device=DEVICE)).shape == shape


@pytest.mark.parametrize("name", ["residual", "weight", "running_var"])
def test_device_mismatch(backend, name):
    # Without a second real device, a meta tensor stands in: the check is on the device alone.
    kwargs = args()
    other = "cpu" if DEVICE == "cuda" else "meta"
    kwargs[name] = kwargs[name].to(other)
    with pytest.raises(ValueError, match=f"{name} is on {other}"):
        call(backend, **kwargs)


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"unknown backend 'cudnn'.*available"):
        call("cudnn", **args())
    with pytest.raises(ValueError, match="unknown backend"):
        fused_residual.BatchNormAddReLU2d(3, backend="fast")


def test_unavailable_backend_names_the_available_ones(monkeypatch):
    from fused_residual import backends

    monkeypatch.setattr(backends, "_extension_serves", lambda device_type: False)
    x = torch.randn(2, 3, 4, 4, device=DEVICE)
    with pytest.raises(ValueError, match=r"'extension' is unavailable.*available: \["):
        fused_residual.bn_add_relu(x, None, None, None, training=True, backend="extension")


def test_import_without_extension_falls_back_with_one_warning():
    """A missing or broken _C: import works, "extension" is unavailable, and one warning (at
    import, with the reason and the fix) covers "auto" falling back to the reference."""
    code = """
import sys, warnings
sys.modules["fused_residual._C"] = None  # makes importing fused_residual._C fail
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch, fused_residual
    from fused_residual import ops
    x = torch.randn(4, 3, 5, 5)
    for _ in range(3):
        out = fused_residual.bn_add_relu(x, x, torch.zeros(3), torch.ones(3), training=True)
assert not ops.EXTENSION_LOADED and "_C" in ops.EXTENSION_ERROR, ops.EXTENSION_ERROR
assert "extension" not in fused_residual.available_backends("cpu")
messages = [str(w.message) for w in caught]
assert len(messages) == 1 and "unavailable" in messages[0], messages
assert "--no-build-isolation" in messages[0], messages
ref = torch.relu(torch.nn.functional.batch_norm(x, None, None, training=True) + x)
torch.testing.assert_close(out, ref)
print("ok")
"""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr


def test_available_backends_lists_reference_last():
    names = fused_residual.available_backends("cpu")
    assert names[-1] == "reference"
    assert set(names) <= {"extension", "triton", "reference"}


# --------------------------------------------------------------------------------------
# One set of argument rules for every backend's ops (fused_residual/checks.py and its C++
# twin csrc/op_checks.h): the same bad call raises the same exception type, with a message
# naming the argument, whichever backend runs it.
# --------------------------------------------------------------------------------------


def _op_args(x):
    """count, mean, var, weight and a mask for ops on `x`."""
    c = x.shape[1]
    count = x.shape[0] * x.shape[2] * x.shape[3]
    m, v, w = torch.zeros(c, device=x.device), torch.ones(c, device=x.device), torch.ones(c, device=x.device)
    mask = torch.zeros((x.numel() + 7) // 8, dtype=torch.uint8, device=x.device)
    return count, m, v, w, mask


def _bad_op_calls():
    """(name, op, args, exception, words in the message) for each rule."""
    x = torch.randn(2, 3, 4, 5, device=DEVICE)
    count, m, v, w, mask = _op_args(x)
    empty = torch.randn(0, 3, 4, 5, device=DEVICE)
    wide_mask = torch.zeros(2 * mask.numel(), dtype=torch.uint8, device=DEVICE)
    calls = [
        ("stats N*H*W == 0", "stats", (empty,), ValueError, r"N\*H\*W"),
        ("stats 3-D input", "stats", (x[0],), ValueError, "4-D"),
        ("stats int input", "stats", (x.int(),), TypeError, "dtype"),
        ("running stats count 1", "update_running_stats", (m, v, 1, m.clone(), v.clone(), 0.1), ValueError,
         "count"),
        ("running stats var length", "update_running_stats", (m, v[:2], 4, m.clone(), v.clone(), 0.1),
         ValueError, "var"),
        ("apply residual dtype", "apply", (x, x.double(), m, v, w, None, 1e-5, True), TypeError,
         "residual dtype"),
        ("apply residual shape", "apply", (x, x[:1], m, v, w, None, 1e-5, True), ValueError,
         "residual shape"),
        ("apply weight length", "apply", (x, None, m, v, w[:2], None, 1e-5, True), ValueError, "weight"),
        ("apply bias dtype", "apply", (x, None, m, v, None, w.int(), 1e-5, True), TypeError, "bias"),
        ("dual input2 shape", "dual_apply", (x, m, v, None, None, x[:1], m, v, None, None, 1e-5, 1e-5, True),
         ValueError, "input2 shape"),
        ("dual var2 length", "dual_apply", (x, m, v, None, None, x, m, v[:2], None, None, 1e-5, 1e-5, True),
         ValueError, "var2"),
        ("reduce N*H*W == 0", "backward_reduce", (empty, mask[:0], empty, m, v, 1e-5), ValueError,
         r"N\*H\*W"),
        ("reduce mask length", "backward_reduce", (x, mask[:-1], x, m, v, 1e-5), ValueError, "mask"),
        ("reduce mask dtype", "backward_reduce", (x, mask.bool(), x, m, v, 1e-5), TypeError, "mask"),
        ("reduce mask strided", "backward_reduce", (x, wide_mask[::2], x, m, v, 1e-5), ValueError,
         "mask must be contiguous"),
        ("reduce grad_out shape", "backward_reduce", (x[:1], mask, x, m, v, 1e-5), ValueError, "grad_out"),
        ("apply-backward count 0", "backward_apply", (x, mask, x, m, v, w, m, m, 1e-5, 0, True, True),
         ValueError, "count"),
        ("apply-backward count 0, grad_residual only", "backward_apply",
         (x, mask, x, m, v, w, m, m, 1e-5, 0, False, True), ValueError, "count"),
        ("apply-backward one sum", "backward_apply", (x, mask, x, m, v, w, m, None, 1e-5, count, True, True),
         ValueError, "sum_dy"),
        ("apply-backward mask strided", "backward_apply",
         (x, wide_mask[::2], x, m, v, w, m, m, 1e-5, count, True, True), ValueError,
         "mask must be contiguous"),
        ("apply-backward sum_dy_xmu length", "backward_apply",
         (x, mask, x, m, v, w, m, m[:1], 1e-5, count, True, True), ValueError, "sum_dy_xmu"),
    ]
    return [pytest.param(op, args, error, words, id=name) for name, op, args, error, words in calls]


@pytest.mark.parametrize("op, args, error, words", _bad_op_calls())
def test_every_backend_rejects_the_same_bad_op_calls(op, args, error, words):
    from fused_residual.backends import backend_ops

    assert FUSED_BACKENDS, "no fused backend to check"
    for backend in FUSED_BACKENDS:
        with pytest.raises(error, match=words):
            getattr(backend_ops(backend), op)(*args)


def test_every_backend_takes_empty_elementwise_calls():
    """N*H*W == 0 is an error for the reductions only: the element-wise ops return empty
    outputs (the same rule everywhere)."""
    from fused_residual.backends import backend_ops

    x = torch.randn(0, 3, 4, 5, device=DEVICE)
    count, m, v, w, mask = _op_args(x)
    for backend in FUSED_BACKENDS:
        ops = backend_ops(backend)
        out, out_mask = ops.apply(x, x, m, v, w, w, 1e-5, True)
        assert out.shape == x.shape and out_mask.shape == (0,), backend
        out, _ = ops.dual_apply(x, m, v, w, w, x, m, v, None, None, 1e-5, 1e-5, True)
        assert out.shape == x.shape, backend
        gi, gr = ops.backward_apply(x, mask, x, m, v, w, None, None, 1e-5, count, True, True)
        assert gi.shape == x.shape and gr.shape == x.shape, backend


# --------------------------------------------------------------------------------------
# nn's exception classes: the same refused input raises an instance of nn's class in the
# module and the functional forms (a class deriving from both where they differ).
# --------------------------------------------------------------------------------------


def _outcome(fn):
    try:
        return fn(), None
    except Exception as exc:  # the exception is the subject of the test
        return None, exc


def _functional_args(**change):
    x = torch.randn(2, 3, 4, 4, device=DEVICE)
    args = dict(input=x, residual=torch.randn_like(x), running_mean=torch.zeros(3, device=DEVICE),
                running_var=torch.ones(3, device=DEVICE), weight=torch.ones(3, device=DEVICE),
                bias=torch.zeros(3, device=DEVICE), training=True, eps=1e-5)
    args.update(change)
    return args


def _nn_functional(a):
    out = F.batch_norm(a["input"], a["running_mean"], a["running_var"], a["weight"], a["bias"], a["training"],
                       0.1, a["eps"])
    return F.relu(out + a["residual"] if a["residual"] is not None else out)


def _fused_functional(a):
    return fused_residual.bn_add_relu(a["input"], a["residual"], a["running_mean"], a["running_var"],
                                      a["weight"], a["bias"], a["training"], 0.1, a["eps"])


OTHER = "cpu" if DEVICE != "cpu" else "meta"  # a second device for the mismatch cases
FUNCTIONAL_REFUSALS = {
    "int input": dict(input=torch.randint(0, 5, (2, 3, 4, 4))),
    "bool input": dict(input=torch.ones(2, 3, 4, 4, dtype=torch.bool)),
    "complex input": dict(input=torch.randn(2, 3, 4, 4, dtype=torch.complex64)),
    "weight of 4 for 3 channels": dict(weight=torch.ones(4)),
    "bias of 2": dict(bias=torch.zeros(2)),
    "running_mean of 4": dict(running_mean=torch.zeros(4)),
    "2-D running_var": dict(running_var=torch.ones(3, 1)),
    "int64 weight": dict(weight=torch.ones(3, dtype=torch.int64)),
    "float64 weight, float32 input": dict(weight=torch.ones(3, dtype=torch.float64)),
    "float64 input, float32 parameters": dict(input=torch.randn(2, 3, 4, 4, dtype=torch.float64),
                                              residual=torch.randn(2, 3, 4, 4, dtype=torch.float64)),
    "bfloat16 input, float64 parameters": dict(
        input=torch.randn(2, 3, 4, 4).bfloat16(), residual=torch.randn(2, 3, 4, 4).bfloat16(),
        running_mean=torch.zeros(3, dtype=torch.float64), running_var=torch.ones(3, dtype=torch.float64),
        weight=None, bias=None),
    "running_var None": dict(running_var=None),
    "running_mean None": dict(running_mean=None),
    "eval without running statistics": dict(running_mean=None, running_var=None, training=False),
    "negative eps": dict(eps=-1.0),
    "eps 0 in training": dict(eps=0.0),
    "one value per channel": dict(input=torch.randn(1, 3, 1, 1), residual=torch.randn(1, 3, 1, 1)),
    "weight on another device": dict(weight=torch.ones(3, device=OTHER)),
    "running_var on another device": dict(running_var=torch.ones(3, device=OTHER)),
    "residual on another device": dict(residual=torch.ones(2, 3, 4, 4, device=OTHER)),
    "residual of another shape": dict(residual=torch.randn(2, 3, 4, 5)),
    "weight not a tensor": dict(weight=1.0),
}


@pytest.mark.parametrize("case", FUNCTIONAL_REFUSALS)
def test_functional_errors_are_nn_classes(case):
    keep = "another device" in case  # those tensors are on OTHER on purpose
    change = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) and not keep else v
              for k, v in FUNCTIONAL_REFUSALS[case].items()}
    a = _functional_args(**change)
    _, nn_err = _outcome(lambda: _nn_functional(a))
    assert nn_err is not None, f"nn takes {case}: not a refusal case"
    _, err = _outcome(lambda: _fused_functional(a))
    assert isinstance(err, type(nn_err)), f"{case}: {err!r} is not a {type(nn_err).__name__} like {nn_err!r}"


MODULE_REFUSALS = {
    "3-D input": torch.randn(2, 3, 4),
    "5-D input": torch.randn(2, 3, 4, 4, 1),
    "int input": torch.randint(0, 5, (2, 3, 4, 4)),
    "float64 input": torch.randn(2, 3, 4, 4, dtype=torch.float64),
    "4 channels for 3": torch.randn(2, 4, 4, 4),
    "one value per channel": torch.randn(1, 3, 1, 1),
    "not a tensor": [1.0, 2.0],
}


@pytest.mark.parametrize("case", MODULE_REFUSALS)
def test_module_errors_are_nn_classes(case):
    x = MODULE_REFUSALS[case]
    x = x.to(DEVICE) if isinstance(x, torch.Tensor) else x
    _, nn_err = _outcome(lambda: nn.BatchNorm2d(3, device=DEVICE)(x))
    assert nn_err is not None, f"nn takes {case}: not a refusal case"
    _, err = _outcome(lambda: fused_residual.BatchNormAddReLU2d(3, device=DEVICE)(x))
    assert isinstance(err, type(nn_err)), f"{case}: {err!r} is not a {type(nn_err).__name__} like {nn_err!r}"


def test_error_classes_keep_the_earlier_ones():
    """Callers that caught ValueError / TypeError still do: each class derives from both."""
    assert issubclass(ShapeError, ValueError) and issubclass(ShapeError, RuntimeError)
    assert issubclass(DeviceError, ValueError) and issubclass(DeviceError, RuntimeError)
    assert issubclass(DtypeError, TypeError) and issubclass(DtypeError, RuntimeError)
    assert issubclass(UnsupportedDtypeError, TypeError)
    assert issubclass(UnsupportedDtypeError, NotImplementedError)
