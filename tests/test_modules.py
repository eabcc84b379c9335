"""BatchNormAddReLU2d against nn.BatchNorm2d, FusedResidualBlock against the seed block."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import DEVICE, FUSED_BACKENDS, assert_within_rule, is_slow

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
    for training in (True, True, False, True):
        for m in (fused, eager, truth):
            m.train(training)
        x = torch.randn(3, c, 4, 4, device=DEVICE) * 2 + 1
        r = torch.randn_like(x) if residual else None
        grad = torch.randn_like(x)
        got = step(fused, x, r, grad)
        want = step(eager, x, r, grad)
        exact = step(truth, x.double(), r.double() if r is not None else None, grad.double())
        assert_within_rule("output", got[0], want[0], exact[0], torch.float32)
        for key, value in exact[1].items():
            key_fused = key.removeprefix("bn.")
            if value is None:
                assert got[1][key_fused] is None
                continue
            assert_within_rule(key, got[1][key_fused], want[1][key], value, torch.float32)
            for m in (fused, eager, truth):
                m.zero_grad()
        for name, buf in truth.bn.named_buffers():
            fused_buf = dict(fused.named_buffers())[name]
            if name == "num_batches_tracked":
                assert torch.equal(fused_buf, buf), name
            else:
                assert_within_rule(name, fused_buf, dict(eager.bn.named_buffers())[name], buf,
                                   torch.float32)


def test_residual_is_cast_to_input_dtype(backend):
    bn = fused_residual.BatchNormAddReLU2d(4, backend=backend).to(DEVICE)
    x = torch.randn(2, 4, 3, 3, device=DEVICE, dtype=torch.bfloat16)
    r = torch.randn(2, 4, 3, 3, device=DEVICE)
    out = bn(x, r)
    assert out.dtype == torch.bfloat16
    expected = F.relu(nn.BatchNorm2d(4).to(DEVICE).train()(x.float()) + r).to(torch.bfloat16)
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)


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
    seed, fused = _blocks(backend, *channels)
    truth = copy.deepcopy(seed).double()
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    for m in (seed, fused, truth):
        m.to(memory_format=fmt)
    n, hw = (2, 6) if is_slow(backend) else (4, 10)
    for training in (True, False, True):
        for m in (seed, fused, truth):
            m.train(training)
            m.zero_grad()
        x = torch.randn(n, channels[0], hw, hw, device=DEVICE).contiguous(memory_format=fmt)
        out_shape = (n, channels[1], -(-hw // channels[2]), -(-hw // channels[2]))
        grad = torch.randn(out_shape, device=DEVICE)
        got, want, exact = (step(m, xx, None, gg) for m, xx, gg in
                            ((fused, x, grad), (seed, x, grad), (truth, x.double(), grad.double())))
        assert_within_rule("output", got[0], want[0], exact[0], torch.float32)
        assert got[0].is_contiguous(memory_format=fmt)
        for key, value in exact[1].items():
            if value is None:
                continue
            # Conv parameter gradients are not computed by the fused op: they sum its grad_input
            # over n = N*H*W positions, so a last-place difference per term may grow n-fold
            # (the classic summation bound (n-1)·u·Σ|x|). Scale their atol by n.
            scale = None
            if key.startswith(("conv", "shortcut")):
                terms = got[0].numel() / got[0].shape[1]
                scale = terms * max(1.0, value.abs().max().item())
            assert_within_rule(key, got[1][key], want[1][key], value, torch.float32, scale)
        fused_bufs = dict(fused.named_buffers())
        for name, buf in truth.named_buffers():
            if name.endswith("num_batches_tracked"):
                assert torch.equal(fused_bufs[name], buf), name
            else:
                assert_within_rule(name, fused_bufs[name], dict(seed.named_buffers())[name], buf,
                                   torch.float32)


def test_state_dict_round_trip(backend):
    seed, fused = _blocks(backend, 4, 8, 1)
    seed.train()(torch.randn(2, 4, 5, 5, device=DEVICE))  # move the running stats
    fused.load_state_dict(seed.state_dict(), strict=True)
    back = ResidualBlock(4, 8).to(DEVICE)
    back.load_state_dict(fused.state_dict(), strict=True)
    for (name, a), (_, b) in zip(seed.state_dict().items(), back.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
