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


def tiny_hf(transformers) -> nn.Module:
    """A two-stage Hugging Face ResNet: folds, tails through `self.layer`, a dual tail."""
    torch.manual_seed(0)
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[16, 32], depths=[1, 2], num_labels=10)
    return randomize_norms(transformers.ResNetForImageClassification(config)).to(DEVICE)



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
        patterns = ("bn_apply", "bn_dual_apply", "bn_train_forward")
        if func.namespace == "fused_residual" and func._opname.endswith(patterns):
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
