"""BatchNormAddReLU2d as a drop-in for the installed torch's nn.BatchNorm2d: the constructor
signature, and relu(bn(x) [+ r]) on PyTorch's own BatchNorm2d sample inputs
(`torch.testing._internal.common_modules`, the ModuleInfo of nn.BatchNorm2d) in train and
eval, float32 and float64, NCHW and channels_last: every fused backend against a float64
nn.BatchNorm2d under the derived bound (tests/bounds.py; eager nn.BatchNorm2d held to it
too): outputs, gradients (input, residual, weight, bias) and buffers; the reference backend
bit for bit eager nn.BatchNorm2d + add + ReLU (what it is: not a numerics test). And a weight
without a bias (what `bias=False` builds) in every backend, functional and dual.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
import torch.nn as nn
from bounds import bn_add_relu_bounds
from helpers import (
    DEVICE,
    FUSED_BACKENDS,
    assert_within_bound,
    batch_norm_call,
    check_against_reference,
    is_slow,
    make_case,
)
from test_dual import check_dual, make_dual_case
from test_modules import EagerTail

import fused_residual

pytest.importorskip("expecttest", reason="torch.testing._internal.common_modules needs expecttest")
from torch.testing._internal.common_modules import module_db

BN_INFO = next(info for info in module_db if info.module_cls is nn.BatchNorm2d)


def test_signature_matches_nn_batchnorm2d():
    """Every parameter of the installed torch's nn.BatchNorm2d, in the same position, kind and
    default; `backend` is the only addition, keyword-only."""
    ours = list(inspect.signature(fused_residual.BatchNormAddReLU2d.__init__).parameters.values())
    theirs = list(inspect.signature(nn.BatchNorm2d.__init__).parameters.values())
    by_name = {p.name: p for p in ours}
    for i, p in enumerate(theirs):
        assert p.name in by_name, p.name
        q = by_name[p.name]
        assert (q.kind, q.default) == (p.kind, p.default), (p, q)
        if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD:
            assert ours[i].name == p.name, (i, p.name)
    extra = [p for p in ours if p.name not in {t.name for t in theirs}]
    if "bias" not in {t.name for t in theirs}:  # an older torch: `bias` is ours, rejected when not True
        extra = [p for p in extra if p.name != "bias"]
        with pytest.raises(TypeError):
            nn.BatchNorm2d(3, bias=False)
        with pytest.raises(TypeError):
            fused_residual.BatchNormAddReLU2d(3, bias=False)
    assert [(p.name, p.kind) for p in extra] == [("backend", inspect.Parameter.KEYWORD_ONLY)]


def test_positional_device_and_dtype():
    bn = fused_residual.BatchNormAddReLU2d(4, 1e-3, 0.2, True, True, "cpu", torch.float64)
    assert bn.weight.dtype == torch.float64 and bn.running_mean.device.type == "cpu"
    assert (bn.eps, bn.momentum) == (1e-3, 0.2)


def _step(module, x, r, grad):
    x = x.detach().clone().requires_grad_(True)
    r = None if r is None else r.detach().clone().requires_grad_(True)
    out = module(x, r)
    if out.numel():
        out.backward(grad)
    grads = {"input": x.grad, "residual": None if r is None else r.grad}
    grads.update({n.removeprefix("bn."): p.grad for n, p in module.named_parameters()})
    buffers = {n.removeprefix("bn."): b.detach().clone() for n, b in module.named_buffers()}
    return out.detach(), grads, buffers


def _sample_inputs(dtype, training):
    return BN_INFO.module_inputs_func(BN_INFO, device=DEVICE, dtype=dtype, requires_grad=False,
                                      training=training)


def _modules(sample, dtype, backend, i):
    """The sample's nn.BatchNorm2d and a BatchNormAddReLU2d with the same state (weights,
    bias and running stats away from 1, 0, 0, 1)."""
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    torch.manual_seed(i)
    plain = nn.BatchNorm2d(*args, **kwargs).to(device=DEVICE, dtype=dtype)
    fused = fused_residual.BatchNormAddReLU2d(*args, **kwargs, backend=backend).to(device=DEVICE, dtype=dtype)
    assert list(fused.state_dict()) == list(plain.state_dict())
    assert (fused.bias is None) == (plain.bias is None) and fused.affine == plain.affine
    g = torch.Generator().manual_seed(100 + i)
    with torch.no_grad():
        for t, lo in ((plain.weight, 0.5), (plain.bias, -0.5), (plain.running_mean, -0.2),
                      (plain.running_var, 0.5)):
            if t is not None:
                t.copy_(torch.rand(t.shape, generator=g, dtype=dtype) + lo)
    fused.load_state_dict(plain.state_dict())
    return plain, fused


def _cases(dtype, training, layout):
    """(i, sample, x, residual, grad) for every sample, with and without a residual."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    samples = _sample_inputs(dtype, training)
    # Six samples (default, 2d_simple_average, momentum, not_affine, not_tracking_stats,
    # zero_batch), and affine_not_bias on a torch whose BatchNorm2d takes `bias`.
    has_bias_arg = "bias" in inspect.signature(nn.BatchNorm2d.__init__).parameters
    assert len(samples) >= 6 + has_bias_arg
    for i, sample in enumerate(samples):
        x = sample.forward_input.args[0].detach().contiguous(memory_format=fmt)
        g = torch.Generator().manual_seed(i)
        for residual in (None, torch.randn(x.shape, generator=g).to(x).contiguous(memory_format=fmt)):
            yield i, sample, x, residual, torch.randn(x.shape, generator=g).to(x)


def _sync_buffers(source: nn.Module, *targets: nn.Module) -> None:
    """Each step starts every module from the fused one's running statistics (the same rounded
    inputs: the truth must not carry its own earlier step's exact values)."""
    for t in targets:
        with torch.no_grad():
            for b, c in zip(source.buffers(), t.buffers(), strict=True):
                c.copy_(b)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", BN_INFO.dtypes, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_pytorch_sample_inputs(backend, training, dtype, layout):
    interpreted_cases = ((torch.float32, "nchw"), (torch.float64, "channels_last"))
    if is_slow(backend) and (dtype, layout) not in interpreted_cases:
        pytest.skip("interpreted Triton (slow): float32 NCHW and float64 channels_last cover both")
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    for i, sample, x, residual, grad in _cases(dtype, training, layout):
        plain, fused = _modules(sample, dtype, backend, i)
        eager, truth = EagerTail(copy.deepcopy(plain)), EagerTail(copy.deepcopy(plain).double())
        mine = copy.deepcopy(fused)
        for m in (mine, eager, truth):
            m.train(training)
        for step in range(2):  # twice: the second step starts from updated running stats
            _sync_buffers(mine, eager.bn, truth.bn)
            call = batch_norm_call(mine)
            got = _step(mine, x, residual, grad)
            want = _step(eager, x, residual, grad)
            exact = _step(truth, x.double(), None if residual is None else residual.double(), grad.double())
            case = f"{sample.desc or 'default'} residual={residual is not None} step {step}"
            assert got[0].dtype == dtype, case
            assert got[0].is_contiguous(memory_format=fmt) or not x.numel(), case
            dy = torch.where(got[0] > 0, grad.double(), torch.zeros((), dtype=torch.float64))
            bounds = bn_add_relu_bounds(x, residual, dy=dy, **call)
            assert_within_bound(f"{case} output", got[0], exact[0], bounds["output"], want[0], True)
            for key, value in exact[1].items():
                if value is None:
                    assert got[1][key] is None, (case, key)
                    continue
                assert_within_bound(f"{case} grad {key}", got[1][key], value, bounds[f"grad_{key}"],
                                    want[1][key], True)
            for key, value in exact[2].items():
                if key == "num_batches_tracked":
                    assert torch.equal(got[2][key], value), case
                    continue
                # Unchanged (bound 0) where not updated: eval, or not tracking.
                assert_within_bound(f"{case} {key}", got[2][key], value, bounds.get(key, 0.0), want[2][key],
                                    True)
            for m in (mine, eager, truth):
                m.zero_grad(set_to_none=True)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_reference_backend_is_eager_pytorch(training, layout):
    """The reference backend computes what eager nn.BatchNorm2d + add + ReLU computes, bit for
    bit, on the same samples: outputs, gradients and buffers, two steps."""
    for i, sample, x, residual, grad in _cases(torch.float32, training, layout):
        plain, fused = _modules(sample, torch.float32, "reference", i)
        eager = EagerTail(plain)
        for m in (fused, eager):
            m.train(training)
        for _ in range(2):
            got, want = _step(fused, x, residual, grad), _step(eager, x, residual, grad)
            assert torch.equal(got[0], want[0])
            for part in (1, 2):
                assert got[part].keys() == want[part].keys()
                for key, value in want[part].items():
                    same = (value is None and got[part][key] is None) or torch.equal(got[part][key], value)
                    assert same, key
            for m in (fused, eager):
                m.zero_grad(set_to_none=True)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_pytorch_error_inputs(training):
    """PyTorch's error inputs for BatchNorm2d (eps <= 0): the same exception type, or none
    where nn.BatchNorm2d takes it (eps=0 in eval)."""
    errors = BN_INFO.module_error_inputs_func(BN_INFO, device=DEVICE, dtype=torch.float32,
                                              requires_grad=False, training=training)
    assert errors
    for err in errors:
        sample = err.module_error_input
        args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
        x = sample.forward_input.args[0]
        outcomes = []
        for cls in (nn.BatchNorm2d, fused_residual.BatchNormAddReLU2d):
            module = cls(*args, **kwargs).to(DEVICE).train(training)
            try:
                module(x)
                outcomes.append(None)
            except Exception as exc:  # comparing what each raises
                outcomes.append(type(exc))
        assert outcomes[0] == outcomes[1], (kwargs, outcomes)
    with pytest.raises(ValueError, match="expected 4D input"):
        fused_residual.BatchNormAddReLU2d(3)(torch.randn(2, 3, 4))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_weight_without_bias_every_backend(backend, training):
    """bias=None with a weight (what bias=False builds), in bn_add_relu and both BatchNorms of
    dual_bn_add_relu, against eager PyTorch and float64 under the rule; no bias gradient."""
    x, r, w, _, rm, rv = make_case((2, 5, 4, 3), torch.float32)
    got = check_against_reference(backend, x, r, w, None, rm, rv, training=training, momentum=0.1)
    assert got[1]["grad_bias"] is None and got[1]["grad_weight"] is not None
    first, second = make_dual_case((2, 5, 4, 3), torch.float32)
    first, second = (*first[:2], None, *first[3:]), (*second[:2], None, *second[3:])
    got = check_dual(backend, first, second, training=training)
    assert got[1]["grad_bias"] is None and got[1]["grad_bias2"] is None
