"""Shared test helpers: devices, backends, cases and the numerics contract (docs/op_layer.md).

The bound rule (tests/bounds.py): every result of a fused op is compared with a float64
reference on the same (dtype-rounded) inputs, and its error may be at most a bound derived
from the computation: the unit roundoff of each rounding times the sum of the absolute
values of the terms it rounds, carried through the op to first order, plus the float64
reference's own. Eager PyTorch in the same dtype is held to the same bound (a failure there
is a wrong derivation), and the old figure, the fused error against twice eager's, is
reported beside it (`assert_within_bound`), never a gate: one sample of eager's error
passes or fails by CPU.

The ReLU kink: where the pre-activation y is within a few ulps of 0, two correct backends
may round it to opposite signs, and then their gradients differ by the whole incoming
gradient there. So the reference a fused result is checked against takes its ReLU
decisions from the fused output itself (`relu_as`, with bits = fused output > 0): the
values are still checked everywhere (an output of the wrong sign is off from the
reference's y by |y|, within the bound of y only if y is within rounding of 0), and the
gradients are those of the backend's own decisions. That the backend's saved mask equals
its output's signs is checked op by op (tests/test_ops.py).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from bounds import bn_add_relu_bounds

import fused_residual
from fused_residual.reference import bn_add_relu_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FUSED_BACKENDS = [b for b in fused_residual.available_backends(DEVICE) if b != "reference"]
# Triton under the interpreter runs on CPU, one element at a time in numpy: keep it small.
INTERPRETED = DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def is_slow(backend: str) -> bool:
    return backend == "triton" and INTERPRETED


def store_truncates(backend: str, dtype: torch.dtype) -> bool:
    """Whether `backend` stores `dtype` results by truncation: Triton's interpreter converts
    float32 to bfloat16 toward zero (an error of up to one ulp; compiled kernels round to
    nearest; tests/test_functional.py pins it). The bounds allow for it there and only there."""
    return is_slow(backend) and dtype == torch.bfloat16


def assert_within_bound(name: str, got: torch.Tensor, truth: torch.Tensor, bound, eager=None,
                        eager_in_bound: bool = False) -> float:
    """|got - truth| <= bound elementwise (bound from tests/bounds.py, broadcast to got's
    shape); non-finite values where and as the truth's. `eager`, PyTorch's own result in the
    same dtype, is reported beside it (the old rule's figure: the fused error against twice
    eager's) and, with `eager_in_bound`, must meet the bound too: eager float32/float64
    PyTorch computes as the bound assumes, so exceeding it means a wrong derivation (in
    float16/bfloat16 eager rounds intermediates to the low dtype, the fused ops do not, so
    there it is reported only). Returns the fused error's largest fraction of the bound."""
    assert got.shape == truth.shape, f"{name}: shape {tuple(got.shape)} != {tuple(truth.shape)}"
    truth = truth.detach().double()
    bound = torch.as_tensor(bound, dtype=torch.float64, device=truth.device).expand(truth.shape)
    finite = torch.isfinite(truth)
    checked = {"fused": got}
    if eager is not None and eager_in_bound:
        checked["eager PyTorch"] = eager
    fractions = {}
    for who, value in checked.items():
        value = value.detach().double()
        assert torch.equal(torch.isfinite(value), finite), f"{name}: {who}: non-finite values differ"
        assert torch.equal(value[~finite].nan_to_num(), truth[~finite].nan_to_num()), \
            f"{name}: {who}: non-finite values differ"
        err = torch.where(finite, (value - truth).abs(), torch.zeros((), dtype=torch.float64))
        if not err.numel():
            fractions[who] = 0.0
            continue
        fractions[who] = (err / bound).nan_to_num(nan=0.0, posinf=float("inf")).max().item()
        excess = err - bound
        if excess.max().item() > 0:
            idx = tuple(torch.nonzero(excess == excess.max())[0].tolist())
            old = ""
            if eager is not None:
                eager_err = (eager.detach().double() - truth)[finite].abs().max().item()
                old = (f"; the old rule's figure: fused max error {err.max().item():.3e}, 2x eager's "
                       f"{2 * eager_err:.3e}")
            why = "" if who == "fused" else " (eager PyTorch outside the derived bound: a wrong derivation)"
            raise AssertionError(
                f"{name}: {who} error {err[idx].item():.3e} > derived bound {bound[idx].item():.3e} "
                f"at {list(idx)}: {who} {value[idx].item():.9g}, truth {truth[idx].item():.9g}{old}{why}")
    return fractions["fused"]


def eager_computes_as_bounded(dtype: torch.dtype) -> bool:
    """Whether eager PyTorch's BatchNorm in `dtype` is an implementation tests/bounds.py covers
    (accumulation and intermediates in float32/float64, one rounding to the output)."""
    return dtype in (torch.float32, torch.float64)


def output_grad(out: torch.Tensor, grad_seed: int = 1, rounded_to: torch.dtype | None = None) -> torch.Tensor:
    """The output gradient `run_case` feeds a backward: seeded, rounded to `rounded_to` (the
    dtype of the op under test: a float64 truth gets the same rounded values), in the
    output's dtype."""
    g = torch.Generator().manual_seed(grad_seed)
    grad = torch.randn(out.shape, generator=g).to(rounded_to or out.dtype)
    return grad.to(device=out.device, dtype=out.dtype)


def ulp(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


# The fewest values a whole network's output is compared over under the rule below (the
# logits of a batch: 2 x 1000 for a torchvision ResNet at batch 2).
MODEL_OUTPUT_MIN_VALUES = 1000
# examples/train_resnet.py's classes in the tests that run it at batch 4: 2048 logits, 1024
# per rank of two, for its own check of the logits under the same rule.
EXAMPLE_CLASSES = 512


def assert_model_output_within_rule(name: str, got: torch.Tensor, eager: torch.Tensor,
                                    truth: torch.Tensor, dtype: torch.dtype = torch.float32) -> None:
    """A whole network's output computed by another implementation of it (onnxruntime, an
    exported, unfused or traced program), against the float64 truth: no bound derived per op
    reaches through a network's convolutions, so the contract's other form, over many values:
    max|got - truth| <= 2 max|eager - truth| + eps(dtype)·max(1, max|truth|). Only over at least
    MODEL_OUTPUT_MIN_VALUES values: over one scalar or a per-channel vector, eager's error is
    one sample that passes or fails by CPU (the ops inside are held to derived bounds by
    test_ops, test_functional and FusedOpAudit)."""
    truth, got, eager = truth.double(), got.double(), eager.double()
    finite = torch.isfinite(truth)
    assert torch.equal(torch.isfinite(got), finite), f"{name}: non-finite values differ"
    count = int(finite.sum())
    assert count >= MODEL_OUTPUT_MIN_VALUES, \
        f"{name}: {count} values, too few for the rule (use a derived bound, tests/bounds.py)"
    worst = (got - truth)[finite].abs().max().item()
    eager_worst = (eager - truth)[finite].abs().max().item()
    bound = 2 * eager_worst + torch.finfo(dtype).eps * max(1.0, truth[finite].abs().max().item())
    assert worst <= bound, \
        f"{name} ({dtype}): max error {worst:.3e} > {bound:.3e} (2x eager's {eager_worst:.3e} + 1 ulp)"


def batch_norm_call(bn: torch.nn.Module) -> dict:
    """The arguments an nn.BatchNorm2d (or a fused norm module) passes to F.batch_norm on its
    next call, as detached copies taken before it (so before its num_batches_tracked
    increment): the running statistics it reads or updates (None where unused), weight,
    bias, whether it uses batch statistics, the momentum factor (1/num_batches_tracked with
    momentum=None) and eps. What `bn_add_relu_bounds` takes after x and the residual."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None and bn.momentum is None:
        factor = 1.0 / (float(bn.num_batches_tracked) + 1)
    keep = not bn.training or bn.track_running_stats

    def copy(t):
        return None if t is None else t.detach().clone()

    return dict(weight=copy(bn.weight), bias=copy(bn.bias),
                running_mean=copy(bn.running_mean) if keep else None,
                running_var=copy(bn.running_var) if keep else None,
                training=bn.training or (bn.running_mean is None and bn.running_var is None),
                momentum=factor, eps=bn.eps)


def make_case(shape, dtype, layout="nchw", residual=True, affine=True, offset=0.0, device=DEVICE,
              seed=0, spread=2.0):
    """Input, residual, weight, bias, running stats for one case (weights away from 1); the
    input is `offset` + a per-channel N(0, 1) + N(0, spread^2) per value, from a generator
    seeded with `seed`."""
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    x = (torch.randn(shape, generator=g) * spread + offset + torch.randn(1, c, 1, 1, generator=g))
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


def run_case(fn, x, r, weight, bias, rm, rv, training, momentum, grad_seed=1, grad_dtype=None):
    """Forward + backward of fn with `output_grad(out, grad_seed, grad_dtype)`; returns output,
    grads (input, residual, weight, bias), stats."""
    x = x.detach().clone().requires_grad_(True)
    r = r.detach().clone().requires_grad_(True) if r is not None else None
    weight = weight.detach().clone().requires_grad_(True) if weight is not None else None
    bias = bias.detach().clone().requires_grad_(True) if bias is not None else None
    rm = rm.clone() if rm is not None else None
    rv = rv.clone() if rv is not None else None
    out = fn(x, r, rm, rv, weight, bias, training, momentum)
    out.backward(output_grad(out, grad_seed, grad_dtype))
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
    """The fused op's output, gradients and running statistics against a float64 truth on the
    same inputs under the derived bound (tests/bounds.py), eager PyTorch in x's dtype held to
    it too; both references take the fused output's ReLU decisions (no flakes at the kink).
    Returns the fused results (output, grads, running_mean, running_var)."""
    dtype = x.dtype
    fused = run_case(fused_fn(backend), x, r, weight, bias, rm, rv, training, momentum)
    bits = fused[0].detach() > 0
    reference = reference_with_relu_bits(bits)
    eager = run_case(reference, x, r, weight, bias, rm, rv, training, momentum)
    truth = run_case(reference, to64(x), to64(r), to64(weight), to64(bias), to64(rm), to64(rv),
                     training, momentum, grad_dtype=dtype)
    dy = torch.where(bits, output_grad(fused[0]).double(), torch.zeros((), dtype=torch.float64))
    bounds = bn_add_relu_bounds(x, r, weight, bias, rm, rv, training, momentum, 1e-5, dy,
                                truncating_store=store_truncates(backend, dtype))
    assert fused[0].dtype == dtype
    check_eager = eager_computes_as_bounded(dtype)
    assert_within_bound("output", fused[0], truth[0], bounds["output"], eager[0], check_eager)
    for key in fused[1]:
        if truth[1][key] is None:
            assert fused[1][key] is None, key
            continue
        assert_within_bound(key, fused[1][key], truth[1][key], bounds[key], eager[1][key], check_eager)
    for i, name in ((2, "running_mean"), (3, "running_var")):
        if truth[i] is not None:
            # Unchanged in eval: bound 0, the same values.
            assert_within_bound(name, fused[i], truth[i], bounds.get(name, 0.0), eager[i], check_eager)
    return fused
