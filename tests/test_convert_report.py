"""convert_report(model) and convert(model, verbose=True): per module the patterns fused and
each BatchNorm left with why, the totals; the report changes nothing; without verbose, one
warning when nothing was fused and none otherwise."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn

import fused_residual

tv = pytest.importorskip("torchvision")


def mixed_model() -> nn.Module:
    """A resnet18 with one hooked BatchNorm, a LeakyReLU block and a head BatchNorm."""
    torch.manual_seed(0)
    model = tv.models.resnet18(num_classes=10)
    model.layer1[0].bn1.register_forward_hook(lambda m, i, o: None)
    model.layer3[1].relu = nn.LeakyReLU()
    model.fc = nn.Sequential(nn.BatchNorm1d(512), nn.Linear(512, 10))
    model.head_norm = nn.BatchNorm2d(512)  # not in any block: left, and counted
    return model


def test_report_lists_fused_and_left_parts_and_changes_nothing():
    model = mixed_model()
    before = {n: type(m) for n, m in model.named_modules()}
    report = fused_residual.convert_report(model)
    assert {n: type(m) for n, m in model.named_modules()} == before
    text = str(report)
    lines = text.splitlines()
    assert lines[0] == "fused_residual.convert report for ResNet:"
    assert "  (model) [ResNet]: fused bn1+relu" in lines
    assert "  layer1.0 [BasicBlock]: fused bn2+add+relu; left bn1: has module hooks" in lines
    assert ("  layer3.1 [BasicBlock]: left bn1: its output goes to relu (LeakyReLU), not to a ReLU or an "
            "add; bn2: its sum goes to relu (LeakyReLU), not a ReLU") in lines
    assert "  layer2.0 [BasicBlock]: fused bn1+relu, bn2+downsample.1+add+relu" in lines
    assert ("  fc [Sequential]: left 0: is a BatchNorm1d, not a norm convert() fuses (BatchNorm2d, "
            "SyncBatchNorm, FrozenBatchNorm2d)") in lines
    assert "  other norms: head_norm: no traced forward calls it" in lines
    assert lines[-1] == ("totals: 10 modules call norms: 7 fully fused, 1 partly, 2 not; 14 patterns fused "
                         "(17 norms), 5 norms left; 0 modules do not trace")
    assert (report.fused, report.fused_norms, report.left) == (14, 17, 5)


def test_convert_verbose_prints_the_report_and_fuses_what_it_says(capsys):
    model = mixed_model()
    expected = str(fused_residual.convert_report(model))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused_residual.convert(model, verbose=True)
    assert capsys.readouterr().out.strip() == expected
    assert type(model.layer1[0].bn1) is nn.BatchNorm2d  # hooked: left
    assert type(model.layer1[0].bn2) is fused_residual.BatchNormAddReLU2d
    assert type(model.layer3[1].bn1) is nn.BatchNorm2d and type(model.layer3[1].bn2) is nn.BatchNorm2d
    assert type(model.head_norm) is nn.BatchNorm2d
    # On the converted model the report says the same.
    assert str(fused_residual.convert_report(model)) == expected
    x = torch.randn(2, 3, 32, 32)
    original = mixed_model().eval()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), original(x), rtol=1e-4, atol=1e-5)


def test_nothing_fused_warns_once_and_verbose_does_not_warn(capsys):
    model = tv.models.resnet18(norm_layer=lambda c: nn.GroupNorm(2, c))
    with pytest.warns(RuntimeWarning, match=r"fused nothing in ResNet: no BatchNorm layer to fuse \(norm "
                                             r"layers: GroupNorm\)") as record:
        fused_residual.convert(copy.deepcopy(model))
    assert len([w for w in record if "fused_residual" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused_residual.convert(model, verbose=True)
    out = capsys.readouterr().out
    assert "0 patterns fused (0 norms), 0 norms left" in out
    with pytest.raises(TypeError, match=r"nn\.Module"):
        fused_residual.convert_report(model.state_dict())
