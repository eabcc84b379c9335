"""convert() on timm's ResNet family (`timm.create_model(name, pretrained=False)`): what fuses
(the report), the converted model's structure and numerics as tests/model_checks.py checks
them (the reference conversion bit for bit the original, every fused op within its derived
bound), partial fusion where an SE module, DropPath, DropBlock or a non-ReLU activation is in
the way, checkpoints both ways, and torch.compile(fullgraph=True).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from helpers import DEVICE, FUSED_BACKENDS, is_slow

import fused_residual

timm = pytest.importorskip("timm", reason="timm is not installed (pip install fused_residual[timm])")
from model_checks import (  # noqa: E402
    FusedOpAudit,
    assert_reference_conversion_is_original,
    randomize_norms,
    step,
)
from test_convert import OpCounter, compile_and_compare  # noqa: E402
from timm.models import resnet as timm_resnet  # noqa: E402

BACKEND = next((b for b in FUSED_BACKENDS if not is_slow(b)), "reference")

# name -> (blocks, block patterns fused, norms left); the stem adds 1 fused pattern (3 for
# the deep stem of resnet50d: conv1.1+conv1.2, conv1.4+conv1.5, bn1+act1).
MODELS = {
    "resnet18": (8, 16, 0),
    "resnet50": (16, 48, 0),
    "resnet50d": (16, 48, 0),
    "resnext50_32x4d": (16, 48, 0),
    "wide_resnet50_2": (16, 48, 0),
    "seresnet50": (16, 32, 20),  # left: each bn3 (an SE module before the add) and downsample norm
}


def build(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    return randomize_norms(model).to(DEVICE)


def run_steps(model: nn.Module, x: torch.Tensor, backward: bool = True, seed: int = 7) -> list:
    """A training step (forward + backward: outputs, gradients, buffers; with `backward`, else
    a training forward) and an eval forward, each with the RNG seeded (DropPath / DropBlock
    draw the same masks in every model)."""
    results = []
    for training in (True, False):
        model.train(training)
        torch.manual_seed(seed)
        if backward and training:
            results.append(step(model, x))
        else:
            with torch.no_grad():
                results.append((model(x), dict(model.named_buffers())))
    return results


def check_converted(fused: nn.Module, original: nn.Module, x: torch.Tensor, fused_parts: int,
                    backward: bool = True) -> None:
    """Structure (the reference conversion of `original` bit for bit the original) and the
    numerics of every fused op of `fused` (tests/model_checks.py), over `run_steps`: one
    fused op per fused part per forward."""
    assert_reference_conversion_is_original(original, lambda m: run_steps(m, x, backward))
    if BACKEND == "reference":
        return
    with FusedOpAudit() as audit:
        run_steps(copy.deepcopy(fused), x, backward)
    assert audit.calls.get("apply", 0) + audit.calls.get("dual_apply", 0) == 2 * fused_parts, audit.calls


@pytest.mark.parametrize("name", list(MODELS))
def test_model_converts_and_matches(name):
    """Every block recognized, the parts fused as expected (seresnet50: the SE module leaves
    each tail unfused, bn1+act1 and bn2+act2 fuse); a training step (outputs, gradients,
    running statistics) and an eval forward: structure and numerics (module doc)."""
    original = build(name)
    keys = list(original.state_dict())
    fused = fused_residual.convert(copy.deepcopy(original), backend=BACKEND)
    assert list(fused.state_dict()) == keys
    report = fused_residual.convert_report(fused)
    blocks, fused_parts, left = MODELS[name]
    assert len(report.modules) == blocks + 1 + (name == "resnet50d")  # + the stem (+ a deep stem)
    stem_parts = 3 if name == "resnet50d" else 1
    assert (report.fused, report.left) == (fused_parts + stem_parts, left), str(report)
    if left:
        assert "bn3: its output goes to se (SEModule), not to a ReLU or an add" in str(report)
        assert type(fused.layer1[0].bn3) is nn.BatchNorm2d
    assert isinstance(fused.layer1[0], timm_resnet.Bottleneck | timm_resnet.BasicBlock)
    # A block whose tail fuses gets a rewritten forward; seresnet50's (the SE module before the
    # add) fuses bn1+act1 and bn2+act2 by folding its ReLU modules, and keeps its forward.
    assert type(fused.layer1[0]).__name__.startswith("Fused") == (left == 0)

    # 64x64: 8 values per channel in layer4's BatchNorms.
    check_converted(fused, original, torch.randn(2, 3, 64, 64, device=DEVICE), report.fused)


@pytest.mark.parametrize("kwargs, expect", [
    (dict(drop_path_rate=0.2), "bn2: its output goes to drop_path (DropPath), not to a ReLU or an add"),
    (dict(drop_block_rate=0.2), "bn1: its output goes to drop_block (DropBlock2d), not to a ReLU or an add"),
    (dict(act_layer="silu"), "bn1: its output goes to act1 (SiLU), not to a ReLU or an add"),
    (dict(aa_layer=nn.AvgPool2d), None),
], ids=["drop_path", "drop_block", "silu", "aa"])
def test_partial_fusion(kwargs, expect):
    """Only exactly equivalent parts fuse; the rest runs as before, with the same random masks
    in training: structure and numerics of a training and an eval forward, and the report
    names why."""
    original = build("resnet18", **kwargs)
    report = fused_residual.convert_report(original)
    if expect is None:  # anti-aliasing runs after the fused BatchNorm + ReLU: everything fuses
        assert report.left == 0 and report.fused == 17, str(report)
    else:
        assert expect in str(report), str(report)
        assert report.left > 0
    fused = copy.deepcopy(original)
    if report.fused == 0:
        with pytest.warns(RuntimeWarning, match="fused nothing"):
            fused_residual.convert(fused, backend=BACKEND)
    else:
        fused_residual.convert(fused, backend=BACKEND)
    x = torch.randn(2, 3, 64, 64, device=DEVICE)
    check_converted(fused, original, x, report.fused, backward=False)
    # A partly fused block: its fused parts do run fused (no aten batch_norm for them).
    counter = OpCounter()
    with counter, torch.no_grad():
        fused.train()(x)
    ran = sum(counter.counts.get(op, 0) for op in ("bn_apply", "bn_dual_apply", "bn_train_forward"))
    assert ran == report.fused \
        or BACKEND == "reference"


def test_state_dict_both_ways():
    original = build("resnet50d")
    original.train()(torch.randn(2, 3, 32, 32, device=DEVICE))  # move the running stats
    fused = fused_residual.convert(build("resnet50d"), backend=BACKEND)
    fused.load_state_dict(original.state_dict(), strict=True)
    fused.train()(torch.randn(2, 3, 32, 32, device=DEVICE))
    back = build("resnet50d")
    back.load_state_dict(fused.state_dict(), strict=True)
    for (n, a), b in zip(fused.state_dict().items(), back.state_dict().values(), strict=True):
        assert torch.equal(a, b), n


@pytest.mark.skipif(BACKEND == "reference", reason="no compiled fused backend here")
def test_compile_fullgraph():
    """torch.compile(fullgraph=True) of a converted timm ResNet with a deep stem, avg-pool
    shortcuts (dual op) and one SE block (its tail left unfused), forward and backward in
    training: no graph break, the fused ops in the code, values as the eager converted
    model's (96x96: 18 values per channel in layer4's batch statistics)."""
    from timm.layers import create_attn

    torch.manual_seed(0)
    model = timm_resnet.ResNet(block=timm_resnet.BasicBlock, layers=(1, 1, 1, 1), num_classes=10,
                               stem_type="deep", avg_down=True)
    model.layer3[0].se = create_attn("se", model.layer3[0].bn2.num_features)
    model = fused_residual.convert(randomize_norms(model).to(DEVICE), backend=BACKEND).train()
    report = str(fused_residual.convert_report(model))
    assert "layer3.0 [BasicBlock]: fused bn1+act1; left bn2: its output goes to se (SEModule)" in report, \
        report
    code = compile_and_compare(model, torch.randn(2, 3, 96, 96, device=DEVICE))
    for op in ("bn_dual_apply", "bn_apply", "bn_backward_apply", "bn_backward_reduce"):
        assert f"fused_residual.{op}" in code, op
