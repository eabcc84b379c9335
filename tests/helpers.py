"""Shared test helpers: devices, backends and the numerics contract (docs/op_layer.md).

The tolerance rule: a fused result's error against a float64 reference on the same
(dtype-rounded) inputs may be at most 2x the error of PyTorch's own eager ops in the same
dtype, plus a small atol of one unit in the last place of that dtype at the result's scale.
In float64 the eager result *is* the truth (its error is 0), so there the atol alone bounds
the error: 32 units in the last place, room for a different summation order over a few
thousand values.

The ReLU kink: where the pre-activation y is within a few ulps of 0, two correct backends
may round it to opposite signs, and then their gradients differ by the whole incoming
gradient there. So the reference a fused result is checked against takes its ReLU
decisions from the fused output itself (`relu_as`, with bits = fused output > 0): the
values are still checked everywhere (an output of the wrong sign is off from the
reference's y by |y|), and the gradients are those of the backend's own decisions. That
the backend's saved mask equals its output's signs is checked op by op (tests/test_ops.py).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

import fused_residual
from fused_residual.reference import bn_add_relu_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FUSED_BACKENDS = [b for b in fused_residual.available_backends(DEVICE) if b != "reference"]
# Triton under the interpreter runs on CPU, one element at a time in numpy: keep it small.
INTERPRETED = DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def is_slow(backend: str) -> bool:
    return backend == "triton" and INTERPRETED


def ulp(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def atol_ulps(dtype: torch.dtype) -> float:
    return 32.0 if dtype == torch.float64 else 1.0


def assert_within_rule(name: str, fused: torch.Tensor, eager: torch.Tensor, truth: torch.Tensor,
                       dtype: torch.dtype, scale: float | None = None) -> None:
    """max|fused - truth| <= 2 max|eager - truth| + atol; atol = k eps(dtype) scale.

    `scale` defaults to max(1, max|truth|); a result that is a cancelling sum (true value near
    0) passes the magnitude of what was summed instead.
    """
    assert fused.shape == truth.shape, f"{name}: shape {fused.shape} != {truth.shape}"
    truth = truth.double()
    fused_err = (fused.double() - truth).abs()
    eager_err = (eager.double() - truth).abs()
    finite = torch.isfinite(truth)
    assert torch.equal(torch.isfinite(fused.double()), finite), f"{name}: non-finite values differ"
    if scale is None:
        scale = max(1.0, truth[finite].abs().max().item()) if finite.any() else 1.0
    atol = atol_ulps(dtype) * ulp(dtype) * scale
    worst = fused_err[finite].max().item() if finite.any() else 0.0
    bound = 2 * (eager_err[finite].max().item() if finite.any() else 0.0) + atol
    if worst > bound:
        idx = torch.nonzero(fused_err == worst)[0].tolist()
        raise AssertionError(
            f"{name} ({dtype}): max error {worst:.3e} > bound {bound:.3e} (2x eager error + atol "
            f"{atol:.1e}); at {idx}: fused {fused.double()[tuple(idx)].item():.6g}, truth "
            f"{truth[tuple(idx)].item():.6g}, eager {eager.double()[tuple(idx)].item():.6g}"
        )


def make_case(shape, dtype, layout="nchw", residual=True, affine=True, offset=0.0, device=DEVICE,
              seed=0):
    """Input, residual, weight, bias, running stats for one case (weights away from 1)."""
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    x = (torch.randn(shape, generator=g) * 2 + offset + torch.randn(1, c, 1, 1, generator=g))
    r = torch.randn(shape, generator=g) if residual else None
    weight = torch.rand(c, generator=g) + 0.5 if affine else None
    bias = torch.randn(c, generator=g) * 0.5 if affine else None
    rm = torch.randn(c, generator=g) * 0.1 + offset
    rv = torch.rand(c, generator=g) + 0.5
    x = x.to(device=device, dtype=dtype)
    if r is not None:
        r = r.to(device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        if r is not None:
            r = r.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        # A non-contiguous view: every other column of a wider tensor, residual transposed.
        wide = torch.zeros(n, c, h, 2 * w, device=device, dtype=dtype)
        wide[..., ::2] = x
        x = wide[..., ::2]
        if r is not None:
            r = r.transpose(2, 3).contiguous().transpose(2, 3)
    # BatchNorm parameters are float32 next to low-precision activations (as under autocast),
    # float64 next to float64 ones.
    to = dict(device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    weight = weight.to(**to) if weight is not None else None
    bias = bias.to(**to) if bias is not None else None
    return x, r, weight, bias, rm.to(**to), rv.to(**to)


def run_case(fn, x, r, weight, bias, rm, rv, training, momentum, grad_seed=1):
    """Forward + backward of fn; returns output, grads (input, residual, weight, bias), stats."""
    x = x.detach().clone().requires_grad_(True)
    r = r.detach().clone().requires_grad_(True) if r is not None else None
    weight = weight.detach().clone().requires_grad_(True) if weight is not None else None
    bias = bias.detach().clone().requires_grad_(True) if bias is not None else None
    rm = rm.clone() if rm is not None else None
    rv = rv.clone() if rv is not None else None
    out = fn(x, r, rm, rv, weight, bias, training, momentum)
    g = torch.Generator().manual_seed(grad_seed)
    grad = torch.randn(out.shape, generator=g).to(device=out.device, dtype=out.dtype)
    out.backward(grad)
    grads = {
        "grad_input": x.grad,
        "grad_residual": r.grad if r is not None else None,
        "grad_weight": weight.grad if weight is not None else None,
        "grad_bias": bias.grad if bias is not None else None,
    }
    return out, grads, rm, rv


def reference_fn(x, r, rm, rv, weight, bias, training, momentum, eps=1e-5):
    return bn_add_relu_reference(x, r, rm, rv, weight, bias, training, momentum, eps)


def relu_as(y: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """ReLU of `y` with its decisions taken from `bits` (another result's > 0) instead of
    y's own signs; NaN propagates as in F.relu."""
    keep = bits.to(y.device) | torch.isnan(y)
    return torch.where(keep, y, torch.zeros((), dtype=y.dtype, device=y.device))


def reference_with_relu_bits(bits: torch.Tensor):
    """`reference_fn` whose ReLU follows `bits` (see the module docstring)."""
    def fn(x, r, rm, rv, weight, bias, training, momentum, eps=1e-5):
        y = F.batch_norm(x, rm, rv, weight, bias, training, momentum, eps)
        return relu_as(y if r is None else y + r, bits)
    return fn


def fused_fn(backend):
    def fn(x, r, rm, rv, weight, bias, training, momentum, eps=1e-5):
        return fused_residual.bn_add_relu(x, r, rm, rv, weight, bias, training, momentum, eps,
                                          backend=backend)
    return fn


def to64(t):
    return None if t is None else t.detach().double()


def check_against_reference(backend, x, r, weight, bias, rm, rv, training, momentum):
    """Fused vs eager PyTorch in x's dtype vs a float64 truth, under the tolerance rule, both
    references with the fused output's ReLU decisions (no flakes at the kink)."""
    dtype = x.dtype
    fused = run_case(fused_fn(backend), x, r, weight, bias, rm, rv, training, momentum)
    reference = reference_with_relu_bits(fused[0].detach() > 0)
    eager = run_case(reference, x, r, weight, bias, rm, rv, training, momentum)
    truth = run_case(reference, to64(x), to64(r), to64(weight), to64(bias), to64(rm), to64(rv),
                     training, momentum)
    assert_within_rule("output", fused[0], eager[0], truth[0], dtype)
    assert fused[0].dtype == dtype
    for key in fused[1]:
        if truth[1][key] is None:
            assert fused[1][key] is None, key
            continue
        grad_dtype = dtype if key in ("grad_input", "grad_residual") else weight.dtype
        assert_within_rule(key, fused[1][key], eager[1][key], truth[1][key], grad_dtype)
    for i, name in ((2, "running_mean"), (3, "running_var")):
        if truth[i] is not None:
            assert_within_rule(name, fused[i], eager[i], truth[i], torch.float32)
    return fused
