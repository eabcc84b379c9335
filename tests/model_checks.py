"""Whole-model checks of converted models (tests/test_convert*.py, test_modules, test_tracing):
what convert() wires, and the numerics of every fused op the model runs.

A deep network amplifies rounding differences (test_convert.py's module doc), so no bound on
a converted model's outputs or gradients against float64 both follows from the computation
and is tight enough to catch a wrong kernel: the first-order bound of resnet18's loss is
~1e5 times its float32 error. So a converted model is checked in two parts, each exact or
under the derived bounds of tests/bounds.py, and together complete:

* structure (`assert_reference_conversion_is_original`): convert() with the "reference"
  backend (eager PyTorch: F.batch_norm, add, ReLU) computes the original model's results bit
  for bit: outputs, input and parameter gradients, running statistics. So convert() wires
  every norm with its own parameters, statistics, eps, momentum, mode and residual. (A
  FrozenBatchNorm2d computes x·scale + shift where F.batch_norm computes (x - mean)·invstd·w
  + b: the baseline runs it as `EvalBatchNorm2d`, the same function, F.batch_norm's
  rounding.) The fused backends' composition of their primitive ops into that computation
  is checked op by op (tests/test_functional.py, test_dual.py), under the derived bounds.
* numerics in the model (`FusedOpAudit`): while a converted model runs with a fused
  backend, every primitive op it calls is checked on its own arguments (the model's real
  activations, gradients and statistics, in its dtype and layout) against the reference
  primitive in float64, under the derived bound; an apply op's mask against its own output's
  signs; and every running statistic it updates is a buffer of the model (no copy).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from bounds import primitive_bounds
from helpers import assert_within_bound, store_truncates
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.ops.misc import FrozenBatchNorm2d

import fused_residual
from fused_residual import reference as R


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every BatchNorm2d / FrozenBatchNorm2d: weight and bias away from 1 and 0, running
    statistics away from 0 and 1 (so a dropped affine term or unused statistic shows)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d | FrozenBatchNorm2d):
                c = m.running_mean.numel()
                for t, values in ((m.weight, torch.rand(c, generator=g) + 0.5),
                                  (m.bias, torch.rand(c, generator=g) - 0.5),
                                  (m.running_mean, torch.randn(c, generator=g) * 0.1),
                                  (m.running_var, torch.rand(c, generator=g) + 0.5)):
                    t.copy_(values)
    return model


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def step(model: nn.Module, x: torch.Tensor, grad_seed: int = 1):
    """Forward + backward with a fixed random output gradient; returns the output, the input
    gradient, the parameter gradients and (copies of) the buffers."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = model(x)
    g = torch.Generator().manual_seed(grad_seed)
    out.backward(torch.randn(out.shape, generator=g).to(device=out.device, dtype=out.dtype))
    params = {n: p.grad for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    return out.detach(), x.grad, params, buffers


# --------------------------------------------------------------------------------------------
# Structure: the reference conversion is the original, bit for bit
# --------------------------------------------------------------------------------------------


class EvalBatchNorm2d(nn.Module):
    """A FrozenBatchNorm2d's function as F.batch_norm computes it (eval mode, its buffers and
    eps): the baseline a "reference" conversion of a frozen norm equals bit for bit."""

    def __init__(self, frozen: FrozenBatchNorm2d):
        super().__init__()
        for name in ("weight", "bias", "running_mean", "running_var"):
            self.register_buffer(name, getattr(frozen, name))
        self.eps = frozen.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0,
                            self.eps)


def frozen_as_eval_batch_norm(model: nn.Module) -> nn.Module:
    """`model` (in place) with every FrozenBatchNorm2d replaced by its EvalBatchNorm2d."""
    for name, m in list(model.named_modules()):
        if type(m) is FrozenBatchNorm2d:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, EvalBatchNorm2d(m))
    return model


def _leaves(result) -> list[tuple[str, torch.Tensor | None]]:
    if isinstance(result, dict):
        return [(f"{k}.{n}" if n else str(k), t) for k, v in result.items() for n, t in _leaves(v)]
    if isinstance(result, tuple | list):
        return [(f"{i}.{n}" if n else str(i), t) for i, v in enumerate(result) for n, t in _leaves(v)]
    return [("", result)]


def assert_identical(got, want, what: str = "") -> int:
    """Every tensor of two nested results (dicts, tuples, lists) equal bit for bit (None
    where None); returns how many tensors were compared."""
    a, b = _leaves(got), _leaves(want)
    assert [n for n, _ in a] == [n for n, _ in b], f"{what}: {[n for n, _ in a]} != {[n for n, _ in b]}"
    for (name, x), (_, y) in zip(a, b, strict=True):
        assert (x is None) == (y is None), f"{what} {name}: None on one side only"
        if x is not None:
            assert x.dtype == y.dtype and x.shape == y.shape, f"{what} {name}: {x.dtype}{tuple(x.shape)} " \
                                                             f"vs {y.dtype}{tuple(y.shape)}"
            assert torch.equal(x, y), f"{what} {name}: differs, max |diff| " \
                                      f"{(x.double() - y.double()).abs().max().item():.3e}"
    return sum(x is not None for _, x in a)


def assert_reference_conversion_is_original(original: nn.Module, run: Callable[[nn.Module], object],
                                            steps: int = 1) -> int:
    """convert(copy of `original`, backend="reference") gives what `original` gives, bit for
    bit: `run(model)` (a forward + backward returning tensors: outputs, gradients, buffers)
    `steps` times on copies of each (later steps start from the updated statistics). Returns
    how many tensors were compared. `original` is not touched."""
    with warnings.catch_warnings():  # a model with nothing to fuse says so; its test checks that
        warnings.filterwarnings("ignore", "fused_residual.convert fused nothing", RuntimeWarning)
        converted = fused_residual.convert(copy.deepcopy(original), backend="reference")
    baseline = frozen_as_eval_batch_norm(copy.deepcopy(original))
    compared = 0
    for i in range(steps):
        compared += assert_identical(run(converted), run(baseline), f"reference conversion, step {i}")
    return compared


# --------------------------------------------------------------------------------------------
# Numerics in the model: every fused primitive call against its derived bound
# --------------------------------------------------------------------------------------------


def _to64(args: tuple) -> tuple:
    return tuple(a.detach().double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in args)


class FusedOpAudit(TorchDispatchMode):
    """While active, checks every call of a fused_residual primitive op (either backend) on its
    own arguments (module doc): each result within primitive_bounds of the reference primitive
    in float64 (tests/bounds.py), an apply op's mask the signs of its own output. `calls`
    counts the calls checked per op ("apply", "stats", ...); `updated` holds the storage
    pointers of the running statistics updated. Raises at the first result out of bounds.
    A composite op (bn_train_forward, bn_backward: docs/op_layer.md) runs as called, and its
    backend's primitives run on copies of its arguments, each checked as above; the composite's
    results must be theirs bit for bit."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = {}
        self.updated: set[int] = set()
        self.worst = 0.0
        self.backends: dict[str, str] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if getattr(func, "namespace", None) != "fused_residual":
            return func(*args, **(kwargs or {}))
        assert not kwargs, f"{func}: keyword arguments {kwargs} (the op layer calls positionally)"
        name = func._opname.removeprefix("triton_").removeprefix("bn_")
        self.backends[name] = "triton" if func._opname.startswith("triton_") else "extension"
        if name in ("train_forward", "backward"):
            return self._composite(func, name, args)
        before = tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args)
        out = func(*args)
        with torch.no_grad(), torch.autocast(args[0].device.type, enabled=False):
            self._check(name, before, args, out)
        return out

    def _composite(self, func, name: str, args: tuple):
        prefix = "triton_bn_" if func._opname.startswith("triton_") else "bn_"

        def primitive(op_name: str) -> Callable:
            op = getattr(torch.ops.fused_residual, prefix + op_name).default
            return lambda *a: self.__torch_dispatch__(op, (), a)

        copies = tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args)
        updated = set(self.updated)
        if name == "train_forward":
            want = R.train_forward_steps(primitive("stats"), primitive("update_running_stats"),
                                         primitive("apply"), *copies)
            want = (*want, *copies[2:4])  # then the running statistics, updated in place
        else:
            want = R.backward_steps(primitive("backward_reduce"), primitive("backward_apply"), *copies)
        out = func(*args)
        got = (*out, *args[2:4]) if name == "train_forward" else tuple(out)
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert (g is None and w is None) or torch.equal(g, w), \
                f"{name} call: result {i} differs from its primitives'"
        if name == "train_forward":  # the model's buffers, not the copies, were updated
            self.updated = updated | {t.untyped_storage().data_ptr() for t in args[2:4] if t is not None}
        self.calls[name] = self.calls.get(name, 0) + 1
        return out

    def _check(self, name: str, args: tuple, after: tuple, out) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        what = f"{name} call {self.calls[name]}"
        reference = getattr(R, f"bn_{name}_reference")
        truth_args = _to64(args)
        truth = reference(*truth_args)
        if name == "update_running_stats":
            got, truth = after[3:5], truth_args[3:5]
            self.updated.update(t.untyped_storage().data_ptr() for t in got)
        else:
            got = out
        x = args[2] if name.startswith("backward") else args[0]
        bounds = primitive_bounds(name, args, store_truncates(self.backends[name], x.dtype))
        for i, (g, t, b) in enumerate(zip(got, truth, bounds, strict=True)):
            if b is None:  # the packed mask: the op's own output's signs, bit for bit
                x = args[0]
                want = R.pack_mask(got[0] > 0, R.working_layout(x)) if g.numel() else g
                assert torch.equal(g, want), f"{what}: mask differs from its output's signs"
            elif g.numel():
                self.worst = max(self.worst, assert_within_bound(f"{what} result {i}", g, t, b))

    def assert_updated_buffers_of(self, model: nn.Module) -> None:
        """Every running statistic the fused ops updated is a buffer of `model` (not a copy)."""
        buffers = {b.untyped_storage().data_ptr() for b in model.buffers()}
        assert self.updated, "no running statistics were updated"
        assert self.updated <= buffers, f"{len(self.updated - buffers)} updated running statistics " \
                                        "are not buffers of the model"
