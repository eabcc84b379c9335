"""convert() on timm's ResNet family (`timm.create_model(name, pretrained=False)`): what fuses
(the report), the converted model against the original and a float64 copy under the
tolerance rule, partial fusion where an SE module, DropPath, DropBlock or a non-ReLU
activation is in the way, checkpoints both ways, and torch.compile(fullgraph=True).

Whole models are checked on their outputs (train and eval) and running statistics; gradients
per block, on a downsampling and an identity block (test_convert.py's module doc says why).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from helpers import DEVICE, FUSED_BACKENDS, assert_within_rule, is_slow

import fused_residual

timm = pytest.importorskip("timm", reason="timm is not installed (pip install fused_residual[timm])")
from model_checks import randomize_norms  # noqa: E402
from test_convert import OpCounter, check_rule, compile_and_compare, conv_terms, step  # noqa: E402
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


def forward_all(models, x, training, seed=7):
    outs = []
    for m in models:
        m.train(training)
        torch.manual_seed(seed)  # DropPath / DropBlock draw the same masks in each model
        with torch.no_grad():
            outs.append(m(x.to(next(m.parameters()).dtype)))
    return outs


@pytest.mark.parametrize("name", list(MODELS))
def test_model_converts_and_matches(name):
    """Every block recognized, the parts fused as expected (seresnet50: the SE module leaves
    each tail unfused, bn1+act1 and bn2+act2 fuse); outputs in train (twice: running stats
    move) and eval, and running statistics, under the rule; a training step of a
    downsampling and an identity block (grouped, wide, avg-pool shortcut convs) per block."""
    original = build(name)
    truth = copy.deepcopy(original).double()
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

    # 64x64: 8 values per channel in layer4's BatchNorms (at 32x32, 2 values make batch
    # statistics amplify rounding differences by orders of magnitude in any float32 run).
    x = torch.randn(2, 3, 64, 64, device=DEVICE)
    for training in (True, True, False):
        got, want, exact = forward_all((fused, original, truth), x, training)
        assert_within_rule(f"{name} output", got, want, exact, torch.float32)
    buffers = dict(original.named_buffers())
    for n, b in truth.named_buffers():
        if n.endswith("num_batches_tracked"):
            assert torch.equal(dict(fused.named_buffers())[n], b), n
        else:
            assert_within_rule(n, dict(fused.named_buffers())[n], buffers[n], b, torch.float32)

    for block, shape in (("layer2.0", (2, fused.layer2[0].conv1.in_channels, 8, 8)),
                         ("layer2.1", (2, fused.layer2[1].conv1.in_channels, 4, 4))):
        parts = [m.get_submodule(block).train() for m in (fused, original, truth)]
        x_in = torch.relu(torch.randn(shape, device=DEVICE))  # a block's input is a ReLU output
        check_rule(step(parts[0], x_in), step(parts[1], x_in), step(parts[2], x_in.double()),
                   torch.float32, conv_terms(parts[1], x_in))


@pytest.mark.parametrize("kwargs, expect", [
    (dict(drop_path_rate=0.2), "bn2: its output goes to drop_path (DropPath), not to a ReLU or an add"),
    (dict(drop_block_rate=0.2), "bn1: its output goes to drop_block (DropBlock2d), not to a ReLU or an add"),
    (dict(act_layer="silu"), "bn1: its output goes to act1 (SiLU), not to a ReLU or an add"),
    (dict(aa_layer=nn.AvgPool2d), None),
], ids=["drop_path", "drop_block", "silu", "aa"])
def test_partial_fusion(kwargs, expect):
    """Only exactly equivalent parts fuse; the rest runs as before, with the same random masks
    in training: outputs under the rule in train and eval, and the report names why."""
    original = build("resnet18", **kwargs)
    truth = copy.deepcopy(original).double()
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
    for training in (True, False):
        got, want, exact = forward_all((fused, original, truth), x, training)
        assert_within_rule("output", got, want, exact, torch.float32)
    # A partly fused block: its fused parts do run fused (no aten batch_norm for them).
    counter = OpCounter()
    with counter, torch.no_grad():
        fused.train()(x)
    assert counter.counts.get("bn_apply", 0) + counter.counts.get("bn_dual_apply", 0) == report.fused \
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
