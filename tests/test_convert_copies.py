"""Models outside torchvision and timm: subclasses of torchvision's blocks and ResNet, copies
of a block, and blocks that compute something else. convert() fuses by data flow, so each
fuses exactly its patterns whatever its class (a subclass with its own forward too: a scaled
shortcut is still norm → add → ReLU) and stays an instance of its own class, with its own
methods. A converted model with such classes round-trips through torch.save / torch.load in
a fresh process.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.nn as nn
from helpers import DEVICE, FUSED_BACKENDS, is_slow

import fused_residual
from fused_residual._blocks import FoldedReLU

tv = pytest.importorskip("torchvision")
from model_checks import randomize_norms  # noqa: E402
from test_convert import check_converted  # noqa: E402
from torchvision.models.resnet import BasicBlock, ResNet  # noqa: E402

BACKEND = next((b for b in FUSED_BACKENDS if not is_slow(b)), "reference")


class TaggedBlock(BasicBlock):
    """A subclass that adds a method and keeps torchvision's forward."""

    def describe(self) -> str:
        return f"tagged {self.conv1.in_channels}->{self.conv2.out_channels}"


class OwnForwardBlock(BasicBlock):
    """A subclass with its own forward (a scaled shortcut): not torchvision's computation."""

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + 0.5 * shortcut)


class CopiedBlock(nn.Module):
    """A user's own block built like torchvision's BasicBlock, with the same attribute names
    and a forward that computes the same thing in the same order (other variable names)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, inp):
        """Conv-BN-ReLU, conv-BN, shortcut add, ReLU."""
        skip = inp

        y = self.conv1(inp)
        y = self.bn1(y)
        y = self.relu(y)

        y = self.conv2(y)
        y = self.bn2(y)

        if self.downsample is not None:
            skip = self.downsample(inp)

        y += skip
        y = self.relu(y)

        return y


class LookalikeBlock(CopiedBlock):
    """Same attributes, another computation (ReLU before the add): must stay untouched."""

    def forward(self, inp):
        y = self.relu(self.bn1(self.conv1(inp)))
        y = self.relu(self.bn2(self.conv2(y)))
        return y + (inp if self.downsample is None else self.downsample(inp))


class MyResNet(ResNet):
    """A torchvision ResNet subclass with its own forward (returns features too)."""

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def shortcut(inplanes: int, planes: int, stride: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return randomize_norms(nn.Sequential(
        TaggedBlock(8, 8), CopiedBlock(8, 16, 2, shortcut(8, 16, 2)), OwnForwardBlock(16, 16),
        LookalikeBlock(16, 16), CopiedBlock(16, 16),
    )).to(DEVICE)


def test_subclasses_and_copies_fuse_their_patterns():
    original = net()
    fused = fused_residual.convert(copy.deepcopy(original), backend=BACKEND)
    classes = (TaggedBlock, CopiedBlock, OwnForwardBlock, LookalikeBlock, CopiedBlock)
    for block, cls in zip(fused, classes, strict=True):  # rewritten forwards, subclasses of their class
        assert isinstance(block, cls) and type(block).__name__ == f"Fused{cls.__name__}"
    assert fused[0].describe() == "tagged 8->8"  # the subclass's own methods stay
    assert type(fused[2].bn2) is type(fused[3].bn2) is fused_residual.BatchNormAddReLU2d
    assert type(fused[1].downsample[1]) is nn.BatchNorm2d  # read by the dual op
    report = str(fused_residual.convert_report(fused))
    assert "  1 [CopiedBlock]: fused bn1+relu, bn2+downsample.1+add+relu" in report
    assert "  2 [OwnForwardBlock]: fused bn1+relu, bn2+add+relu" in report  # relu(bn2 + 0.5 * shortcut)
    assert "  3 [LookalikeBlock]: fused bn1+relu, bn2+relu" in report  # ReLU before its add
    assert fused_residual.convert_report(fused).fused_norms == 11
    x = torch.relu(torch.randn(2, 8, 8, 8, device=DEVICE))
    for training in (True, False):
        check_converted(fused, original, x, training, expect_ops=() if BACKEND == "reference" else ("apply",))


def test_resnet_subclass_with_own_forward_fuses_its_stem():
    torch.manual_seed(0)
    model = MyResNet(BasicBlock, [1, 1, 1, 1])
    fused_residual.convert(model, backend=BACKEND)
    assert type(model) is MyResNet  # the ReLU module is folded: the forward is kept
    assert type(model.bn1) is fused_residual.BatchNormAddReLU2d and type(model.relu) is FoldedReLU
    assert type(model.layer1[0]).__name__ == "FusedBasicBlock"
    assert "  (model) [MyResNet]: fused bn1+relu" in str(fused_residual.convert_report(model))


def test_torch_save_load_in_a_fresh_process():
    """The fused classes of user classes are found by name when unpickling elsewhere."""
    model = fused_residual.convert(net().eval(), backend=BACKEND)
    x = torch.randn(2, 8, 8, 8, device=DEVICE)
    with torch.no_grad():
        want = model(x)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.pt")
        torch.save({"model": model, "x": x, "want": want}, path)
        script = (
            "import sys, torch; sys.path.insert(0, sys.argv[2]);"
            "d = torch.load(sys.argv[1], weights_only=False); m = d['model'];"
            "assert type(m[1]).__name__ == 'FusedCopiedBlock', type(m[1]);"
            "assert torch.equal(m(d['x']), d['want']); print('loaded ok')"
        )
        env = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0")}
        done = subprocess.run([sys.executable, "-c", script, path, os.path.dirname(__file__)],
                              capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and "loaded ok" in done.stdout, done.stdout + done.stderr[-3000:]
