"""BatchNormAddReLU2d against nn.BatchNorm2d (a float64 copy, under the derived bound of
tests/bounds.py, the float32 one held to it too), FusedResidualBlock against the seed block
(its reference-backend twin bit for bit the seed, every fused op of it within its derived
bound: tests/model_checks.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from bounds import bn_add_relu_bounds
from helpers import DEVICE, FUSED_BACKENDS, assert_within_bound, batch_norm_call, is_slow
from model_checks import FusedOpAudit, assert_identical

import fused_residual
from fused_residual.seed import ResidualBlock


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", FUSED_BACKENDS)


class EagerTail(nn.Module):
    """nn.BatchNorm2d + add + ReLU, the module BatchNormAddReLU2d replaces."""

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        self.bn = bn

    def forward(self, x, r=None):
        out = self.bn(x)
        return F.relu(out + r if r is not None else out)


def step(module, x, r, grad):
    x = x.detach().clone().requires_grad_(True)
    r = r.detach().clone().requires_grad_(True) if r is not None else None
    out = module(x) if r is None else module(x, r)
    out.backward(grad)
    grads = {"input": x.grad, "residual": r.grad if r is not None else None}
    grads.update({name: p.grad for name, p in module.named_parameters()})
    return out, grads


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(momentum=None), dict(momentum=0.0), dict(affine=False),
     dict(track_running_stats=False), dict(eps=1e-3)],
    ids=["default", "cumulative", "momentum0", "noaffine", "nostats", "eps"],
)
@pytest.mark.parametrize("residual", [True, False], ids=["add", "noadd"])
def test_batchnorm_module_matches_nn(backend, kwargs, residual):
    torch.manual_seed(0)
    c = 5
    fused = fused_residual.BatchNormAddReLU2d(c, backend=backend, **kwargs).to(DEVICE)
    plain = nn.BatchNorm2d(c, **kwargs).to(DEVICE)
    if fused.affine:
        with torch.no_grad():
            fused.weight.uniform_(0.5, 1.5)
            fused.bias.uniform_(-0.5, 0.5)
    plain.load_state_dict(fused.state_dict())
    assert list(fused.state_dict()) == list(plain.state_dict())
    truth = EagerTail(copy.deepcopy(plain).double())
    eager = EagerTail(plain)
    g = torch.Generator().manual_seed(1)
    for training in (True, True, False, True):
        for m in (fused, eager, truth):
            m.train(training)
        # Every step from the fused module's running statistics (the same rounded inputs).
        with torch.no_grad():
            for m in (eager.bn, truth.bn):
                for source, target in zip(fused.buffers(), m.buffers(), strict=True):
                    target.copy_(source)
        call = batch_norm_call(fused)
        x = torch.randn(3, c, 4, 4, generator=g).to(DEVICE) * 2 + 1
        r = torch.randn(x.shape, generator=g).to(DEVICE) if residual else None
        grad = torch.randn(x.shape, generator=g).to(DEVICE)
        got = step(fused, x, r, grad)
        want = step(eager, x, r, grad)
        exact = step(truth, x.double(), r.double() if r is not None else None, grad.double())
        dy = torch.where(got[0] > 0, grad.double(), torch.zeros((), dtype=torch.float64))
        bounds = bn_add_relu_bounds(x, r, dy=dy, **call)
        assert_within_bound("output", got[0], exact[0], bounds["output"], want[0], True)
        for key, value in exact[1].items():
            key_fused = key.removeprefix("bn.")
            if value is None:
                assert got[1][key_fused] is None
                continue
            assert_within_bound(key, got[1][key_fused], value, bounds[f"grad_{key_fused}"], want[1][key],
                                True)
        for m in (fused, eager, truth):
            m.zero_grad()
        for name, buf in truth.bn.named_buffers():
            fused_buf = dict(fused.named_buffers())[name]
            if name == "num_batches_tracked":
                assert torch.equal(fused_buf, buf), name
            else:  # unchanged (bound 0) where not updated
                assert_within_bound(name, fused_buf, buf, bounds.get(name, 0.0),
                                    dict(eager.bn.named_buffers())[name], True)


def test_residual_is_cast_to_input_dtype(backend):
    bn = fused_residual.BatchNormAddReLU2d(4, backend=backend).to(DEVICE)
    x = torch.randn(2, 4, 3, 3, device=DEVICE, dtype=torch.bfloat16)
    r = torch.randn(2, 4, 3, 3, device=DEVICE)
    out = bn(x, r)
    assert out.dtype == torch.bfloat16
    expected = F.relu(nn.BatchNorm2d(4).to(DEVICE).train()(x.float()) + r).to(torch.bfloat16)
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)


class _Doubled(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return 2 * w


def test_module_reads_its_tensors_where_nn_module_does(backend):
    """The module reads weight, bias and the running statistics from nn.Module's parameter and
    buffer dicts (modules.module_tensors, for the host overhead), falling back to getattr: a
    parametrized weight, a reassigned buffer and torch.func.functional_call's substitutes are
    what it computes with, bit for bit as a module holding those values."""
    from torch.nn.utils import parametrize

    g = torch.Generator().manual_seed(0)
    x, r = (torch.randn(2, 4, 3, 3, generator=g).to(DEVICE) for _ in range(2))
    weight, mean = torch.rand(4, generator=g).to(DEVICE) + 0.5, torch.randn(4, generator=g).to(DEVICE)

    def module():
        return fused_residual.BatchNormAddReLU2d(4, backend=backend).to(DEVICE).eval()

    holding = module()
    with torch.no_grad():
        holding.weight.copy_(weight)
        holding.running_mean.copy_(mean)
    want = holding(x, r)
    parametrized = module()
    parametrize.register_parametrization(parametrized, "weight", _Doubled())
    with torch.no_grad():
        parametrized.parametrizations.weight.original.copy_(weight / 2)  # exact: a power of 2
    parametrized.running_mean = mean.clone()
    assert torch.equal(parametrized(x, r), want)
    substituted = torch.func.functional_call(module(), {"weight": weight, "running_mean": mean}, (x, r))
    assert torch.equal(substituted, want)


def _blocks(backend, in_channels, out_channels, stride):
    torch.manual_seed(0)
    seed = ResidualBlock(in_channels, out_channels)
    if stride != 1:
        # The seed has no stride; give it the same downsampling the fused block has.
        seed.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, stride=stride)
        seed.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride)
    for bn in (seed.bn1, seed.bn2):
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    fused = fused_residual.FusedResidualBlock(in_channels, out_channels, stride, backend=backend)
    fused.load_state_dict(seed.state_dict(), strict=True)
    assert list(fused.state_dict()) == list(seed.state_dict())
    return seed.to(DEVICE), fused.to(DEVICE)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize(
    "channels", [(8, 8, 1), (4, 8, 1), (8, 8, 2)], ids=["identity", "project", "stride2"]
)
def test_block_matches_seed(backend, channels, layout):
    """Training, eval and training again: FusedResidualBlock with the reference backend gives
    the seed block's outputs, gradients and buffers bit for bit (the same computation), and
    with `backend` every fused op it runs meets its derived bound."""
    seed, fused = _blocks(backend, *channels)
    _, twin = _blocks("reference", *channels)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    for m in (seed, fused, twin):
        m.to(memory_format=fmt)
    n, hw = (2, 6) if is_slow(backend) else (4, 10)
    g = torch.Generator().manual_seed(2)
    for training in (True, False, True):
        for m in (seed, fused, twin):
            m.train(training)
            m.zero_grad()
        x = torch.randn(n, channels[0], hw, hw, generator=g).to(DEVICE).contiguous(memory_format=fmt)
        out_shape = (n, channels[1], -(-hw // channels[2]), -(-hw // channels[2]))
        grad = torch.randn(out_shape, generator=g).to(DEVICE)
        results = [(*step(m, x, None, grad), dict(m.named_buffers())) for m in (twin, seed)]
        assert_identical(*results, "reference block vs seed")
        with FusedOpAudit() as audit:
            got = step(fused, x, None, grad)
        assert audit.calls["apply"] == 2 and audit.calls["backward_apply"] == 2, audit.calls
        assert got[0].is_contiguous(memory_format=fmt)
        if training:
            audit.assert_updated_buffers_of(fused)


def test_state_dict_round_trip(backend):
    seed, fused = _blocks(backend, 4, 8, 1)
    seed.train()(torch.randn(2, 4, 5, 5, device=DEVICE))  # move the running stats
    fused.load_state_dict(seed.state_dict(), strict=True)
    back = ResidualBlock(4, 8).to(DEVICE)
    back.load_state_dict(fused.state_dict(), strict=True)
    for (name, a), (_, b) in zip(seed.state_dict().items(), back.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
