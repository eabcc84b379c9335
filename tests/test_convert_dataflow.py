"""convert() by data flow (issue 20): models whose classes convert() has never seen fuse exactly
the norms that sit in a fusable pattern (the counts are those of the models' structure), and
the converted model computes what the original does.

For each model, in float64 (the fused backend against eager PyTorch: summation order only):
the exact number of norms fused and left; a training step (output, input and parameter
gradients, running statistics) and an eval forward against the unconverted model within
TOL of each tensor's scale; state_dict keys unchanged and checkpoints loading both ways;
copy.deepcopy and pickling (torch.save / torch.load) computing bitwise what the converted
model does; and every fused pattern running its fused op (counted at dispatch). Inputs are
64x64 where a network downsamples 32x: at 32x32 its last BatchNorms normalize N·H·W = 2
values per channel, where any two float64 summation orders differ by 1e-7 (PyTorch's own
NCHW and channels_last runs of resnet50 do), which would test the conditioning, not the
fusion.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import DEVICE, FUSED_BACKENDS, is_slow
from torch.utils._python_dispatch import TorchDispatchMode

import fused_residual
from fused_residual import _norms
from fused_residual.seed import ResidualBlock

tv = pytest.importorskip("torchvision")
from model_checks import randomize_norms  # noqa: E402

BACKEND = next((b for b in FUSED_BACKENDS if not is_slow(b)), "reference")
TOL = 1e-9  # max |converted - original| / max(1, max |original|), float64


# --------------------------------------------------------------------------------------------
# Models written by hand
# --------------------------------------------------------------------------------------------


class CifarBlock(nn.Module):
    """The CIFAR-style BasicBlock people write: functional ReLUs, `+=`, a conv+BN shortcut."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or inplanes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class CifarResNet(nn.Module):
    def __init__(self, widths=(8, 16, 32), num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, inplanes = [], widths[0]
        for i, w in enumerate(widths):
            layers += [CifarBlock(inplanes, w, 1 if i == 0 else 2), CifarBlock(w, w)]
            inplanes = w
        self.layers = nn.Sequential(*layers)
        self.linear = nn.Linear(widths[-1], num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.avg_pool2d(out, out.size()[3])
        return self.linear(out.view(out.size(0), -1))


class PreActBlock(nn.Module):
    """Pre-activation (BN → ReLU → conv): the add takes no BatchNorm's output."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        if stride != 1 or inplanes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out += shortcut
        return out


class PreActResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.layers = nn.Sequential(PreActBlock(8, 8), PreActBlock(8, 16, 2), PreActBlock(16, 16))
        self.bn = nn.BatchNorm2d(16)
        self.linear = nn.Linear(16, 10)

    def forward(self, x):
        out = self.layers(self.conv1(x))
        out = F.relu(self.bn(out))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


class FusedOpCounter(TorchDispatchMode):
    """Counts the fused patterns run: each runs one apply op (eval), one bn_train_forward (an
    eager training forward: docs/op_layer.md, the composite ops) or one bn_dual_apply."""

    def __init__(self) -> None:
        super().__init__()
        self.applies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fused_residual" and func._opname.endswith(("bn_apply", "bn_dual_apply", "bn_train_forward")):
            self.applies += 1
        return func(*args, **(kwargs or {}))


def primary(out):
    """The tensor a model returns (Hugging Face: logits or last_hidden_state)."""
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def step(model: nn.Module, x: torch.Tensor, training: bool):
    model.train(training).zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = primary(model(x))
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
    out.backward(grad.to(out.device))
    return (out.detach(), x.grad, {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
            {n: b.detach().clone() for n, b in model.named_buffers()})


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor, tol: float = TOL) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, name
    if got.dtype in (torch.int64, torch.bool):
        assert torch.equal(got, want), name
        return
    err = (got - want).abs().max().item() if got.numel() else 0.0
    scale = max(1.0, want.abs().max().item()) if got.numel() else 1.0
    assert err <= tol * scale, f"{name}: max error {err:.3e} > {tol:.0e} x {scale:.3e}"


def assert_same_step(got, want) -> None:
    assert_close("output", got[0], want[0])
    assert_close("input grad", got[1], want[1])
    assert got[2].keys() == want[2].keys()
    for n in want[2]:
        assert_close(f"grad {n}", got[2][n], want[2][n])
    for n in want[3]:
        assert_close(f"buffer {n}", got[3][n], want[3][n])


def batch_norms(model: nn.Module) -> int:
    return sum(_norms.is_batch_norm(m) for m in model.modules())


def check_model(original: nn.Module, x: torch.Tensor, fused_norms: int, fused: int) -> nn.Module:
    """The module doc's checks; returns the converted model."""
    original = randomize_norms(original).to(DEVICE, torch.float64)
    x = x.to(DEVICE, torch.float64)
    model = copy.deepcopy(original)
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    assert fused_residual.convert(model, backend=BACKEND) is model
    report = fused_residual.convert_report(model)
    assert report.fused_norms == fused_norms, str(report)
    assert report.left == batch_norms(original) - fused_norms, str(report)
    assert report.fused == fused, str(report)
    assert all(p is params[n] for n, p in model.named_parameters())
    assert list(model.state_dict()) == keys
    for training in (True, False):
        assert_same_step(step(model, x, training), step(original, x, training))
    for n, value in model.state_dict().items():  # the same running statistics after the steps
        assert_close(n, value, original.state_dict()[n])
    copy.deepcopy(original).load_state_dict(model.state_dict(), strict=True)
    copy.deepcopy(model).load_state_dict(original.state_dict(), strict=True)

    model.eval()
    counter = FusedOpCounter()
    with torch.no_grad(), counter:
        want = primary(model(x))
    if BACKEND != "reference":
        assert counter.applies == report.fused
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        assert [type(m) for m in other.modules()] == [type(m) for m in model.modules()]
        with torch.no_grad():
            assert torch.equal(primary(other(x)), want)
    return model


def x64(size: int = 64, channels: int = 3) -> torch.Tensor:
    return torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------------------------
# Models: exact counts and equivalence
# --------------------------------------------------------------------------------------------


def check_count(model: nn.Module, fused_norms: int, fused: int) -> fused_residual.ConvertReport:
    """The exact counts on a full-size model (converted, not run: the narrow variants of the
    same structure are run, in float64 on CPU, where full widths take minutes)."""
    fused_residual.convert(model, backend=BACKEND)
    report = fused_residual.convert_report(model)
    left = batch_norms(model) - fused_norms
    assert (report.fused_norms, report.fused, report.left) == (fused_norms, fused, left), str(report)
    return report


def test_cifar_resnet():
    """Stem and every BasicBlock: F.relu after bn1, `out += shortcut` then F.relu; the dual op
    where the shortcut is Sequential(conv, BN)."""
    torch.manual_seed(0)
    model = check_model(CifarResNet(), x64(32), fused_norms=1 + 6 * 2 + 2, fused=1 + 6 * 2)
    assert type(model).__name__ == "FusedCifarResNet" and isinstance(model, CifarResNet)
    assert type(model.layers[2].shortcut[1]) is nn.BatchNorm2d  # read by the dual op
    assert "  layers.2 [CifarBlock]: fused bn1+relu, bn2+shortcut.1+add+relu" in \
        str(fused_residual.convert_report(model))


def test_preact_resnet():
    torch.manual_seed(0)
    check_model(PreActResNet(), x64(32), fused_norms=3 * 2 + 1, fused=7)


@pytest.mark.parametrize("inplanes", [3, 8], ids=["conv shortcut", "identity shortcut"])
def test_seed_residual_block(inplanes):
    torch.manual_seed(0)
    model = check_model(ResidualBlock(inplanes, 8), x64(16, inplanes), fused_norms=2, fused=2)
    assert isinstance(model, ResidualBlock) and type(model.bn2) is fused_residual.BatchNormAddReLU2d


def test_transformers_resnet_model():
    """Hugging Face's ResNet-50 (its default config): every block's last conv layer ends in
    its BatchNorm (activation nn.Identity) inside `self.layer`, and the add and ReLU are in the
    block's forward; its top-level forward, the embeddings and the encoder do not trace."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    report = check_count(transformers.ResNetModel(transformers.ResNetConfig()), fused_norms=53, fused=49)
    text = str(report)
    assert "  encoder.stages.0.layers.0 [ResNetBottleNeckLayer]: fused " \
           "layer.2.normalization+shortcut.normalization+add+activation" in text
    assert "  encoder.stages.1.layers.1.layer.0 [ResNetConvLayer]: fused normalization+activation" in text
    assert {p for p, _, _ in report.untraced} == {"", "embedder", "encoder"}
    assert "  not traced: (model) [ResNetModel]: TraceError: symbolically traced variables cannot be used " \
           "as inputs to control flow" in text
    narrow = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[32, 64, 128, 256])
    model = check_model(transformers.ResNetModel(narrow), x64(), fused_norms=53, fused=49)
    block = model.encoder.stages[0].layers[0]
    assert type(block.layer[2].normalization) is nn.BatchNorm2d  # reached through self.layer: read
    assert type(block.layer[0].activation).__name__ == "FoldedReLU" and type(block.layer[0]) is \
        transformers.models.resnet.modeling_resnet.ResNetConvLayer  # its forward is kept


def test_transformers_resnet_for_image_classification():
    """ResNetForImageClassification, bottleneck (ResNet-50) and basic layers (a ResNet-18
    config: 20 BatchNorms)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    full = transformers.ResNetForImageClassification(transformers.ResNetConfig())
    check_count(full, fused_norms=53, fused=49)
    config = transformers.ResNetConfig(layer_type="basic", depths=[2, 2, 2, 2],
                                       hidden_sizes=[16, 32, 64, 128], embedding_size=16, num_labels=10)
    check_model(transformers.ResNetForImageClassification(config), x64(), fused_norms=20, fused=17)


def test_regnet_y_400mf():
    """`self.proj(x) + self.f(x)`: two children ending in BatchNorms, the dual op; the
    Conv2dNormActivation (Sequential) pairs with their ReLU modules folded."""
    from torchvision.models.regnet import BlockParams, RegNet

    torch.manual_seed(0)
    report = check_count(tv.models.regnet_y_400mf(num_classes=10), fused_norms=53, fused=49)
    assert "  trunk_output.block1.block1-0 [ResBottleneckBlock]: fused proj.1+f.c.1+add+activation" \
        in str(report)
    narrow = BlockParams.from_init_params(depth=16, w_0=16, w_a=8.0, w_m=2.09, group_width=8, se_ratio=0.25)
    check_model(RegNet(narrow, num_classes=10), x64(), fused_norms=53, fused=49)


def test_densenet121():
    """Every BatchNorm → ReLU module inside the dense and transition layers (folded: the
    layers keep their forward), and `features` ending in norm5, whose F.relu is in
    DenseNet.forward."""
    torch.manual_seed(0)
    report = check_count(tv.models.densenet121(num_classes=10), fused_norms=121, fused=121)
    assert "  (model) [DenseNet]: fused features.norm5+relu" in str(report)
    narrow = tv.models.DenseNet(growth_rate=8, block_config=(6, 12, 24, 16), num_init_features=16, bn_size=2,
                                num_classes=10)
    model = check_model(narrow, x64(), fused_norms=121, fused=121)
    assert type(model).__name__ == "FusedDenseNet"
    assert type(model.features.denseblock1.denselayer1) is tv.models.densenet._DenseLayer


def test_vgg11_bn():
    torch.manual_seed(0)
    check_count(tv.models.vgg11_bn(num_classes=10), fused_norms=8, fused=8)
    narrow = tv.models.VGG(tv.models.vgg.make_layers([8, "M", 16, "M", 32, 32, "M", 32, 32, "M", 32, 32, "M"],
                                                       batch_norm=True), num_classes=10)
    narrow.classifier = nn.Linear(32 * 7 * 7, 10)
    model = check_model(narrow, x64(32), fused_norms=8, fused=8)
    assert type(model.features) is nn.Sequential and type(model) is tv.models.VGG  # folded ReLU modules


def test_torchvision_resnet50():
    """(Its numerics: tests/test_convert.py.)"""
    torch.manual_seed(0)
    check_count(tv.models.resnet50(num_classes=10), fused_norms=53, fused=49)


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


# --------------------------------------------------------------------------------------------
# A converted model elsewhere: a fresh process, torch.fx, torch.export, torch.compile
# --------------------------------------------------------------------------------------------


def tiny_hf(transformers) -> nn.Module:
    """A two-stage Hugging Face ResNet: folds, tails through `self.layer`, a dual tail."""
    torch.manual_seed(0)
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[16, 32], depths=[1, 2], num_labels=10)
    return randomize_norms(transformers.ResNetForImageClassification(config)).to(DEVICE)


def test_torch_save_load_in_a_fresh_process(tmp_path):
    """Rewritten forwards are rebuilt from their pickled programs in a process that has not
    converted anything: the same classes, bitwise the same outputs."""
    import subprocess
    import sys

    from torchvision.models.regnet import BlockParams, RegNet

    torch.manual_seed(0)
    params = BlockParams.from_init_params(depth=4, w_0=16, w_a=8.0, w_m=2.0, group_width=8, se_ratio=0.25)
    regnet = RegNet(params)
    models = [fused_residual.convert(randomize_norms(m).eval(), backend=BACKEND)
              for m in (CifarResNet(), regnet, ResidualBlock(3, 8))]
    x = x64(32)
    with torch.no_grad():
        want = [primary(m(x)) for m in models]
    path = tmp_path / "models.pt"
    torch.save({"models": models, "x": x, "want": want, "types": [[type(s).__name__ for s in m.modules()]
                                                                  for m in models]}, path)
    script = (
        "import sys, torch; sys.path.insert(0, sys.argv[2]); from test_convert_dataflow import primary;"
        "d = torch.load(sys.argv[1], weights_only=False);"
        "assert [[type(s).__name__ for s in m.modules()] for m in d['models']] == d['types'];"
        "assert all(torch.equal(primary(m(d['x'])), w) for m, w in zip(d['models'], d['want']));"
        "print('loaded ok')"
    )
    import os

    done = subprocess.run([sys.executable, "-c", script, str(path), os.path.dirname(__file__)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "loaded ok" in done.stdout, done.stdout + done.stderr[-3000:]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fx_trace_and_export(training):
    """torch.fx records one call per fused op through the call sites and the children's
    forwards up to their norm; torch.export keeps the fused ops; both compute what the
    converted model does."""
    transformers = pytest.importorskip("transformers")
    model = fused_residual.convert(tiny_hf(transformers), backend=BACKEND).train(training)
    x = x64(32).to(DEVICE)
    stage = model.resnet.encoder.stages[1]  # (Hugging Face's top-level forward does not trace)
    gm = torch.fx.symbolic_trace(copy.deepcopy(stage))
    targets = " ".join(str(n.target) for n in gm.graph.nodes)
    assert targets.count("fused_norm_forward") == 2 * 2 + 1 and targets.count("fused_dual_forward") == 1
    h = torch.relu(torch.randn(2, 16, 8, 8, device=DEVICE))
    with torch.no_grad():
        assert torch.equal(gm(h), copy.deepcopy(stage)(h))
    exported = torch.export.export(copy.deepcopy(model), (x,))
    assert "fused_residual.bn_dual_apply" in exported.graph_module.code or BACKEND == "reference"
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x).logits, copy.deepcopy(model)(x).logits, rtol=1e-6,
                                   atol=1e-6)


@pytest.mark.skipif(BACKEND == "reference", reason="no compiled fused backend here")
def test_compile_fullgraph():
    """torch.compile(fullgraph=True) traces the call sites, the children's forwards up to
    their norm and the folded ReLUs without a graph break (fullgraph raises), forward and
    backward, with the fused ops in the graphs and the eager converted model's values."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    transformers = pytest.importorskip("transformers")
    model = fused_residual.convert(tiny_hf(transformers), backend=BACKEND).train()
    eager = copy.deepcopy(model)
    graphs: list[str] = []

    def record(gm, example_inputs):
        graphs.append(gm.code)
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    backend = aot_autograd(fw_compiler=record, bw_compiler=record)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    x = x64(32).to(DEVICE)
    out, want = compiled(x).logits, eager(x).logits
    out.sum().backward()
    want.sum().backward()
    torch._dynamo.reset()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(model.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
    forward = graphs[0]
    # The stem, 3 blocks of 2 folds and a tail, 2 of the tails dual.
    assert forward.count("bn_apply.default") == 1 + 3 * 2 + 3 - 2
    assert forward.count("bn_dual_apply.default") == 2
    assert "batch_norm" not in forward


def import_graph(root) -> dict[str, set[str]]:
    """fused_residual's modules -> the fused_residual modules each imports (relative imports,
    at any depth of the file: imports inside functions count)."""
    import ast

    files = {".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__"): p
             for p in root.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imports = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
                imports.update(f"{target}.{a.name}" if f"{target}.{a.name}" in files else target
                               for a in node.names)
        graph[name] = imports - {name}
    return graph


def test_layers_import_downward():
    """The package's layers (op layer -> backends -> modules -> convert) import downward only:
    no import cycle among fused_residual's modules (the convert layer's `_norms` once imported
    `_torchvision`, which imported `_norms`). The package's __init__ imports every layer's API."""
    import pathlib

    graph = import_graph(pathlib.Path(fused_residual.__file__).parent)
    graph.pop("fused_residual")

    def visit(node, stack):
        assert node not in stack, f"import cycle: {' -> '.join([*stack, node])}"
        for nxt in graph.get(node, ()):
            visit(nxt, [*stack, node])

    for name in graph:
        visit(name, [])
