"""convert() by data flow (issue 20), the patterns themselves: what is not exactly fusable is
left (and the report says why), every way people write the ReLU and the add fuses, and what
is decided at each call (shapes, dtypes, hooks, modules replaced after convert()). Models and
checks: tests/test_convert_dataflow.py."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fused_residual

tv = pytest.importorskip("torchvision")
from model_checks import randomize_norms  # noqa: E402
from test_convert_dataflow import (  # noqa: E402
    BACKEND,
    CifarBlock,
    CifarResNet,
    FusedOpCounter,
    assert_close,
    assert_same_step,
    batch_norms,
    step,
    x64,
)

# --------------------------------------------------------------------------------------------
# Negative cases: nothing fused, the model unchanged
# --------------------------------------------------------------------------------------------


class Tail(nn.Module):
    """conv → BN → (something) with a residual; `kind` picks what is in the way."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm3d(4) if kind == "batchnorm3d" else nn.BatchNorm2d(4)
        self.bias = nn.Parameter(torch.zeros(1, 4, 1, 1))
        self.act = nn.LeakyReLU() if kind == "leaky relu" else nn.ReLU()

    def forward(self, x):
        if self.kind == "batchnorm3d":
            return F.relu(self.bn(self.conv(x).unsqueeze(2)).squeeze(2) + x)
        y = self.bn(self.conv(x))
        if self.kind == "used twice":
            return F.relu(y + x) + y
        if self.kind == "alpha":
            return F.relu(torch.add(y, x, alpha=2))
        if self.kind == "broadcast parameter":
            return F.relu(y + self.bias)
        if self.kind == "in place into the residual":
            x = x.clone()
            x += y
            return F.relu(x)
        return self.act(y + x)


NEGATIVE = {
    "used twice": "its output is used 2 times",
    "alpha": "the add has alpha=2",
    "broadcast parameter": "it is added to bias (a parameter or buffer: it would broadcast)",
    "in place into the residual": "its add updates the output of .clone() in place",
    "leaky relu": "its sum goes to act (LeakyReLU), not a ReLU",
    "batchnorm3d": "is a BatchNorm3d, not a norm convert() fuses",
}


@pytest.mark.parametrize("kind", list(NEGATIVE))
def test_not_exactly_fusable_is_left(kind):
    torch.manual_seed(0)
    model = Tail(kind).double()
    original = copy.deepcopy(model)
    with pytest.warns(RuntimeWarning, match="fused nothing in Tail"):
        fused_residual.convert(model, backend=BACKEND)
    assert [type(m) for m in model.modules()] == [type(m) for m in original.modules()]
    report = fused_residual.convert_report(model)
    assert report.fused == 0 and report.left == 1 and NEGATIVE[kind] in str(report), str(report)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    for training in (True, False):
        assert torch.equal(model.train(training)(x), original.train(training)(x))


@pytest.mark.parametrize("arch, norms", [("mobilenet_v2", 52), ("efficientnet_b0", 49)])
def test_other_activations_fuse_nothing(arch, norms):
    """ReLU6 and SiLU after every BatchNorm, and inverted residuals whose add has no ReLU."""
    torch.manual_seed(0)
    model = getattr(tv.models, arch)(num_classes=10).eval()
    original = copy.deepcopy(model)
    with pytest.warns(RuntimeWarning, match="fused nothing"):
        fused_residual.convert(model, backend=BACKEND)
    report = fused_residual.convert_report(model)
    assert report.fused == 0 and report.left == norms == batch_norms(model)
    assert [type(m) for m in model.modules()] == [type(m) for m in original.modules()]
    x = x64(32)
    with torch.no_grad():
        assert torch.equal(model(x), original(x))


def test_batchnorm3d_video_model_fuses_nothing():
    torch.manual_seed(0)
    model = tv.models.video.r3d_18(num_classes=10).eval()
    original = copy.deepcopy(model)
    with pytest.warns(RuntimeWarning, match="fused nothing in VideoResNet"):
        fused_residual.convert(model, backend=BACKEND)
    assert "is a BatchNorm3d, not a norm convert() fuses" in str(fused_residual.convert_report(model))
    assert [type(m) for m in model.modules()] == [type(m) for m in original.modules()]
    x = torch.randn(1, 3, 4, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), original(x))


# --------------------------------------------------------------------------------------------
# Every way to write the ReLU and the add
# --------------------------------------------------------------------------------------------

RELUS = {
    "nn.ReLU": lambda m, y: m.relu(y),
    "nn.ReLU(inplace)": lambda m, y: m.relu_inplace(y),
    "F.relu": lambda m, y: F.relu(y),
    "F.relu(inplace)": lambda m, y: F.relu(y, inplace=True),
    "F.relu_": lambda m, y: F.relu_(y),
    "torch.relu": lambda m, y: torch.relu(y),
    "torch.relu_": lambda m, y: torch.relu_(y),
    "Tensor.relu": lambda m, y: y.relu(),
    "Tensor.relu_": lambda m, y: y.relu_(),
}


def _iadd(y, r):
    y += r
    return y


ADDS = {
    "y + r": lambda y, r: y + r,
    "r + y": lambda y, r: r + y,
    "y += r": _iadd,
    "torch.add(y, r)": lambda y, r: torch.add(y, r),
    "torch.add(r, y)": lambda y, r: torch.add(r, y),
    "torch.add(alpha=1)": lambda y, r: torch.add(y, r, alpha=1),
    "y.add(r)": lambda y, r: y.add(r),
    "r.add(y)": lambda y, r: r.add(y),
    "y.add_(r)": lambda y, r: y.add_(r),
}


class Written(nn.Module):
    """conv → BN [→ nn.Identity] [→ add(residual)] → ReLU, written one of the ways above."""

    def __init__(self, relu: str, add: str | None, identity: bool = False, dual: bool = False) -> None:
        super().__init__()
        self.relu_form, self.add_form, self.dual = RELUS[relu], ADDS[add] if add else None, dual
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.gap = nn.Identity() if identity else None
        self.short = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)) if dual else nn.Conv2d(4, 4, 1)
        self.relu, self.relu_inplace = nn.ReLU(), nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if self.gap is not None:
            y = self.gap(y)
        if self.add_form is not None:
            y = self.add_form(y, self.short(x))
        return self.relu_form(self, y)


def check_written(model: nn.Module, norms: int) -> None:
    torch.manual_seed(0)
    model = randomize_norms(model).double()
    original = copy.deepcopy(model)
    fused_residual.convert(model, backend=BACKEND)
    report = fused_residual.convert_report(model)
    assert (report.fused, report.fused_norms, report.left) == (1, norms, 0), str(report)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    for training in (True, False):
        assert_same_step(step(model, x, training), step(original, x, training))


@pytest.mark.parametrize("relu", list(RELUS))
def test_every_relu(relu):
    check_written(Written(relu, None), norms=1)
    check_written(Written(relu, "y += r", identity=True), norms=1)


@pytest.mark.parametrize("add", list(ADDS))
def test_every_add(add):
    check_written(Written("F.relu", add), norms=1)
    check_written(Written("nn.ReLU(inplace)", add, identity=True, dual=True), norms=2)


# --------------------------------------------------------------------------------------------
# Decided at each call: shapes, dtypes, hooks and modules changed after convert()
# --------------------------------------------------------------------------------------------


class Broadcast(nn.Module):
    """BN → add → ReLU whose residual broadcasts (computed: the graph cannot tell), or has
    another dtype (an out-of-place add promotes)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        r = x.mean((2, 3), keepdim=True) if self.kind == "broadcast" else x.float()
        return F.relu(self.bn(self.conv(x)) + r)


@pytest.mark.parametrize("kind", ["broadcast", "dtype"])
def test_shapes_and_dtypes_are_checked_at_each_call(kind):
    """The fused forward runs the original computation where the residual's shape or (out of
    place) dtype differ: bitwise the original's results, no fused op."""
    torch.manual_seed(0)
    model = randomize_norms(Broadcast(kind)).double()
    original = copy.deepcopy(model)
    fused_residual.convert(model, backend=BACKEND)
    assert fused_residual.convert_report(model).fused == 1
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    counter = FusedOpCounter()
    for training in (True, False):
        with counter:
            got = step(model, x, training)
        want = step(original, x, training)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert all(torch.equal(got[3][n], want[3][n]) for n in want[3])
    assert counter.applies == 0


def test_hooks_and_modules_changed_after_convert():
    """A hook registered after convert() on a module the fused forward does not call (a
    shortcut Sequential, the norm it ends in) makes that pattern run as the original does, so
    the hook fires on the value it always saw; a norm replaced by another module is called."""
    torch.manual_seed(0)
    original = randomize_norms(CifarBlock(4, 8, stride=2)).double()
    model = fused_residual.convert(copy.deepcopy(original), backend=BACKEND)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    seen, want_seen = {}, {}
    for m, store in ((model, seen), (original, want_seen)):
        for name in ("shortcut", "shortcut.1"):
            m.get_submodule(name).register_forward_hook(lambda mod, i, o, name=name, store=store:
                                                        store.__setitem__(name, o.detach().clone()))
    counter = FusedOpCounter()
    with counter:
        got = step(model, x, True)
    assert_same_step(got, step(original, x, True))
    assert seen.keys() == want_seen.keys() == {"shortcut", "shortcut.1"}
    for name in seen:
        assert_close(name, seen[name], want_seen[name])
    assert counter.applies == 2  # bn1 + relu, and bn2 + add + relu with the shortcut as a residual
    model.bn2 = original.bn2 = nn.Identity()
    model.eval(), original.eval()
    with torch.no_grad():
        assert_close("output", model(x), original(x))


class Gated(nn.Module):
    """A forward with data-dependent control flow (does not trace) around blocks that do."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(CifarBlock(4, 4), CifarBlock(4, 8, 2))

    def forward(self, x):
        return self.body(x) if x.sum() > 0 else self.body(-x)


class ModeDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.relu = nn.Conv2d(4, 4, 1), nn.ReLU()
        self.bn, self.bn2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.relu(self.bn(self.conv(x)))  # a fold: the forward is kept
        y = self.bn2(y) + (x if self.training else 2 * x)
        return F.relu(y)


def test_untraced_parents_and_mode_dependent_forwards():
    torch.manual_seed(0)
    model = fused_residual.convert(Gated(), backend=BACKEND)
    report = fused_residual.convert_report(model)
    assert (report.fused_norms, report.left) == (5, 0)
    assert report.untraced == [("", "Gated", "TraceError: symbolically traced variables cannot be used as "
                                             "inputs to control flow")]
    mode = fused_residual.convert(ModeDependent(), backend=BACKEND)
    report = fused_residual.convert_report(mode)
    assert type(mode) is ModeDependent and report.fused == 1
    assert "bn2: the forward that calls it reads self.training" in str(report)


def test_graph_module_input():
    """A model traced by torch.fx before convert() (create_feature_extractor flattens the
    blocks into its root GraphModule; the block modules it keeps are never called): only what
    needs no new forward fuses (the stem's ReLU module folded), the rest is left with the
    reason, and the features are the same."""
    from torchvision.models.feature_extraction import create_feature_extractor

    torch.manual_seed(0)
    model = create_feature_extractor(randomize_norms(tv.models.resnet18()).double().eval(), {"layer2": "c3"})
    x = x64().double()
    with torch.no_grad():
        want = model(x)["c3"]
    fused_residual.convert(model, backend=BACKEND)
    report = fused_residual.convert_report(model)
    assert (report.fused, report.left) == (1, 9), str(report)
    assert "layer1.0.bn2: a torch.fx GraphModule's forward is its graph" in str(report)
    with torch.no_grad():
        assert_close("c3", model(x)["c3"], want)


def test_convert_twice_changes_nothing_but_the_backend():
    torch.manual_seed(0)
    model = fused_residual.convert(CifarResNet(), backend=BACKEND)
    classes = {n: type(m) for n, m in model.named_modules()}
    modules = dict(model.named_modules())
    report = str(fused_residual.convert_report(model))
    fused_residual.convert(model, backend=BACKEND)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert all(m is modules[n] for n, m in model.named_modules())
    assert str(fused_residual.convert_report(model)) == report
    fused_residual.convert(model, backend="reference")
    assert model.bn1.backend == model.layers[0].bn2.backend == "reference"
    assert type(model.layers[0]) is not classes["layers.0"]  # its call sites hold the backend
