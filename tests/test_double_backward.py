"""Second derivatives (gradient penalties): right for every backend, never zeros.

The fused backward ops are not differentiable; under create_graph=True the autograd.Functions
run their backward with the differentiable reference ops (fused_residual/autograd.py).
`torch.autograd.gradgradcheck` compares that graph's derivatives with finite differences in
float64. The test data keep every pre-ReLU value away from 0, so no finite-difference step
crosses the ReLU's kink.
"""

from __future__ import annotations

import pytest
import torch
from helpers import FUSED_BACKENDS, is_slow, make_case

import fused_residual

BACKENDS = [*FUSED_BACKENDS, "reference"]
SHAPE = (2, 3, 3, 3)  # tiny: Triton runs in its interpreter here, and gradgradcheck is O(numel^2)
KINK = 1e-3  # the smallest |pre-ReLU value| the data allow


def gradchecks(fn, inputs: list[torch.Tensor], backend: str) -> None:
    """gradcheck and gradgradcheck of `fn`; for Triton under its interpreter in fast mode (a
    random projection of each Jacobian: a few evaluations instead of one per input value)."""
    fast = is_slow(backend)
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=fast)
    assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=fast)


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors if t is not None]


def _single_case(training: bool, residual: bool, layout: str = "nchw"):
    x, r, w, b, rm, rv = make_case(SHAPE, torch.float64, layout, residual=residual, seed=3)
    pre = torch.nn.functional.batch_norm(x, rm.clone(), rv.clone(), w, b, training)
    if r is not None:
        pre = pre + r
    assert pre.abs().min() > KINK, "test data too close to the ReLU kink; pick another seed"
    return x, r, w, b, rm, rv


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no_residual"])
def test_gradgradcheck_bn_add_relu(backend, training, residual):
    x, r, w, b, rm, rv = _single_case(training, residual)
    # Eval needs running stats (never written); training runs without, so that the many
    # evaluations gradgradcheck makes do not move them.
    stats = (None, None) if training else (rm, rv)

    def fn(x, *rest):
        r_ = rest[0] if residual else None
        w_, b_ = rest[-2:]
        return fused_residual.bn_add_relu(x, r_, *stats, w_, b_, training, backend=backend)

    gradchecks(fn, _leaves(x, r, w, b), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradgradcheck_channels_last(backend):
    """The saved mask is in channels_last memory order: its unpacking must follow it."""
    x, r, w, b, _, _ = _single_case(True, True, "channels_last")

    def fn(x, r, w, b):
        return fused_residual.bn_add_relu(x, r, None, None, w, b, True, backend=backend)

    gradchecks(fn, _leaves(x, r, w, b), backend)


def _dual_case(training: bool, layout2: str):
    x, _, w, b, rm, rv = make_case(SHAPE, torch.float64, residual=False, seed=5)
    x2, _, w2, b2, rm2, rv2 = make_case(SHAPE, torch.float64, layout2, residual=False, seed=6)
    y = (torch.nn.functional.batch_norm(x, rm.clone(), rv.clone(), w, b, training)
         + torch.nn.functional.batch_norm(x2, rm2.clone(), rv2.clone(), w2, b2, training))
    assert y.abs().min() > KINK, "test data too close to the ReLU kink; pick another seed"
    return (x, w, b, rm, rv), (x2, w2, b2, rm2, rv2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout2", ["nchw", "channels_last"])
def test_gradgradcheck_dual_bn_add_relu(backend, training, layout2):
    """Both BatchNorms' second derivatives, input2 in input's layout or not (the backward
    converts it; the conversion must stay connected to input2)."""
    (x, w, b, rm, rv), (x2, w2, b2, rm2, rv2) = _dual_case(training, layout2)
    stats, stats2 = ((None, None), (None, None)) if training else ((rm, rv), (rm2, rv2))

    def fn(x, w, b, x2, w2, b2):
        return fused_residual.dual_bn_add_relu(x, *stats, w, b, x2, *stats2, w2, b2, training,
                                               backend=backend)

    gradchecks(fn, _leaves(x, w, b, x2, w2, b2), backend)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_gradient_penalty_not_zero(backend):
    """The issue's symptom, on the functional: a penalty on d(out)/d(input) gives the
    reference's parameter gradient, not zeros (float32, under the tolerance of float32 sums).
    Fused backends only: the reference against itself would test nothing."""
    x, r, w, b, _, _ = make_case((4, 3, 5, 5), torch.float32, seed=1)
    results = {}
    for name in (backend, "reference"):
        xi, ri, wi, bi = _leaves(x, r, w, b)
        out = fused_residual.bn_add_relu(xi, ri, None, None, wi, bi, True, backend=name)
        (gx,) = torch.autograd.grad(out.square().sum(), xi, create_graph=True)
        gx.square().sum().backward()
        results[name] = (wi.grad, xi.grad)
    for got, want in zip(results[backend], results["reference"], strict=True):
        assert want.abs().max() > 0.1  # the true second derivative is not small here
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_gradient_penalty_converted_resnet18():
    """The issue's reproduction: an input-gradient penalty on a converted resnet18 gives the
    eager model's parameter gradients (float64, so the two agree to rounding; 64x64 images,
    so that layer4's BatchNorms see more than 2 values per channel and the sums stay well
    conditioned)."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    eager = torchvision.models.resnet18(num_classes=10).double()
    fused = fused_residual.convert(torchvision.models.resnet18(num_classes=10).double())
    fused.load_state_dict(eager.state_dict())
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    grads = {}
    for name, model in (("eager", eager), ("fused", fused)):
        xi = x.clone().requires_grad_(True)
        loss = model(xi).logsumexp(dim=1).sum()
        (gx,) = torch.autograd.grad(loss, xi, create_graph=True)
        model.zero_grad()
        gx.square().sum().backward()  # R1-style penalty: |d loss / d x|^2
        grads[name] = {k: p.grad.clone() for k, p in model.named_parameters()}
    assert set(grads["eager"]) == set(grads["fused"])
    # The issue saw |conv1.weight.grad| 0.53 fused vs 7.33 eager.
    for key, want in grads["eager"].items():
        got = grads["fused"][key]
        assert want.norm() > 1e-3, key
        assert (got - want).norm() <= 1e-10 * want.norm(), (key, got.norm().item(), want.norm().item())
