"""convert() on FrozenBatchNorm2d models: torchvision's detection backbones, built the way
torchvision builds them with pretrained weights (`resnet_fpn_backbone(..., norm_layer=
FrozenBatchNorm2d, trainable_layers=3)`), with random buffers, inside Faster R-CNN and
RetinaNet. Structure and numerics as tests/model_checks.py checks them: the reference
conversion equals the original bit for bit (losses, every parameter gradient; a frozen norm
as F.batch_norm in eval computes it), and every fused op of the converted model meets its
derived bound on its own arguments.

Images are 64x64 and the region sampling small, to keep CPU time modest. Detection heads
make discrete choices (top-k, NMS, IoU matching, random sampling): every step reseeds the
RNG, so the converted and original models sample alike, and the checks are deterministic.

A loss is one scalar at the end of a deep network, and one float32 run's error in it is a
single draw (a run may land within 1e-9 of float64, the same model in channels_last 100x
further): no bound on it is both derived and tight (model_checks.py), so none is used.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from helpers import DEVICE, FUSED_BACKENDS, is_slow

import fused_residual
from fused_residual._blocks import FoldedReLU

tv = pytest.importorskip("torchvision")
from model_checks import FusedOpAudit, assert_reference_conversion_is_original, grads, randomize_norms  # noqa: E402
from test_convert import OpCounter  # noqa: E402
from torchvision.models.detection import FasterRCNN, RetinaNet  # noqa: E402
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone  # noqa: E402
from torchvision.ops.feature_pyramid_network import LastLevelP6P7  # noqa: E402
from torchvision.ops.misc import FrozenBatchNorm2d  # noqa: E402

from fused_residual._torchvision import FrozenBatchNormAddReLU2d  # noqa: E402

BACKEND = next((b for b in FUSED_BACKENDS if not is_slow(b)), "reference")
SIZE = 64


def backbone(retina: bool = False) -> nn.Module:
    extra = dict(returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256)) if retina else {}
    return resnet_fpn_backbone(backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d,
                               trainable_layers=3, **extra)


def detector(kind: str) -> nn.Module:
    torch.manual_seed(0)
    common = dict(num_classes=3, min_size=SIZE, max_size=SIZE)
    if kind == "fasterrcnn":
        model = FasterRCNN(backbone(), rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
                           rpn_batch_size_per_image=64, box_batch_size_per_image=32, **common)
    else:
        model = RetinaNet(backbone(retina=True), **common)
    return randomize_norms(model).to(DEVICE)


def images_and_targets(dtype):
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, SIZE, SIZE, generator=g).to(DEVICE, dtype) for _ in range(2)]
    boxes = torch.tensor([[4.0, 8.0, 36.0, 44.0], [20.0, 16.0, 60.0, 56.0]], dtype=dtype, device=DEVICE)
    targets = [dict(boxes=boxes.clone(), labels=torch.tensor([1, 2], device=DEVICE)) for _ in images]
    return images, targets


def train_step(model: nn.Module, dtype):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)  # the same proposal / anchor sampling in every model
    losses = model(*images_and_targets(dtype))
    sum(losses.values()).backward()
    return {k: v.detach() for k, v in losses.items()}, grads(model)


@pytest.mark.parametrize("kind", ["fasterrcnn", "retinanet"])
def test_detector_training_step_matches(kind):
    """Train mode, synthetic images and targets: the reference conversion's losses, parameter
    gradients and buffers bit for bit the unconverted model's, every fused op of the
    converted model within its derived bound; state_dict keys unchanged; the frozen buffers
    untouched; every backbone norm fused (stem and all 16 blocks)."""
    original = detector(kind).train()
    keys = list(original.state_dict())
    fused = fused_residual.convert(copy.deepcopy(original), backend=BACKEND)
    assert list(fused.state_dict()) == keys
    norms = [m for m in fused.backbone.body.modules() if isinstance(m, FrozenBatchNorm2d)]
    fused_norms = [m for m in norms if type(m) is FrozenBatchNormAddReLU2d]
    assert len(fused_norms) == 1 + 3 * 16 and len(norms) == len(fused_norms) + 4  # + 4 shortcut norms
    assert isinstance(fused.backbone.body.relu, FoldedReLU)
    buffers = {n: b.clone() for n, b in fused.named_buffers()}

    def run(model):
        losses, gradients = train_step(model.train(), torch.float32)
        return losses, gradients, dict(model.named_buffers())

    assert assert_reference_conversion_is_original(original, run) > 50
    with FusedOpAudit() as audit:
        losses, got = train_step(fused, torch.float32)
    assert audit.calls["apply"] == 1 + 3 * 16 - 4 and audit.calls["dual_apply"] == 4, audit.calls
    assert audit.calls["backward_apply"] > 0 and "stats" not in audit.calls, audit.calls
    assert set(losses) == set(train_step(original, torch.float32)[0]) and len(got) > 50
    # Frozen layers: no gradient for conv1/layer1 (trainable_layers=3) nor for any norm buffer.
    assert not any(n.startswith(("backbone.body.conv1", "backbone.body.layer1")) for n in got)
    for name, b in fused.named_buffers():
        assert torch.equal(b, buffers[name]), name


def _backbone_pair():
    torch.manual_seed(0)
    original = randomize_norms(backbone()).to(DEVICE)
    return fused_residual.convert(copy.deepcopy(original), backend=BACKEND), original


def test_backbone_eval_features():
    """The FPN backbone alone in eval mode, every conv trainable (the frozen ones too, so that
    each gradient is compared): its feature maps, input gradient and parameter gradients of a
    backward of all features, the reference conversion bit for bit the original's, and every
    fused op of the converted backbone within its derived bound."""
    fused, original = _backbone_pair()
    x = torch.randn(2, 3, SIZE, SIZE, device=DEVICE)

    def run(model):
        model.eval().requires_grad_(True).zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        features = model(xi)
        assert list(features) == ["0", "1", "2", "3", "pool"]
        g = torch.Generator().manual_seed(3)
        sum((f * torch.randn(f.shape, generator=g)).sum() for f in features.values()).backward()
        return {k: v.detach() for k, v in features.items()}, xi.grad, grads(model)

    assert assert_reference_conversion_is_original(original, run) > 50
    with FusedOpAudit() as audit:
        run(fused)
    assert audit.calls["apply"] == 1 + 3 * 16 - 4 and audit.calls["dual_apply"] == 4, audit.calls


@pytest.mark.skipif(BACKEND == "reference", reason="no compiled fused backend here")
def test_frozen_tail_is_eval_op_with_input_and_residual_gradients_only():
    """A frozen fused norm runs the eval-mode op (no statistics pass) in train mode too, and
    its backward has no weight/bias reduction: only the input (and residual) gradient pass."""
    fused, _ = _backbone_pair()
    fused.train()
    body = fused.body
    x = torch.randn(2, 3, SIZE, SIZE, device=DEVICE, requires_grad=True)
    counter = OpCounter()
    with counter:
        out = body(x)
        sum(o.sum() for o in out.values()).backward()
    c = counter.counts
    assert "bn_stats" not in c and "bn_backward_reduce" not in c, c
    assert c.get("bn_dual_apply") == 4 and c.get("bn_apply") == 1 + 16 * 3 - 4, c
    # One input-gradient pass per fused norm (two per dual op: both branches), nothing else:
    # in eager, the composite bn_backward, which in eval is bn_backward_apply alone.
    assert c.get("bn_backward") == 1 + 16 * 3 + 4 and "bn_backward_apply" not in c, c
    assert x.grad is not None
    assert all(b.grad is None for b in body.buffers())


def test_state_dict_both_ways_and_report():
    fused, original = _backbone_pair()
    state = original.state_dict()
    fused.load_state_dict(state, strict=True)
    back = copy.deepcopy(original)
    back.load_state_dict(fused.state_dict(), strict=True)
    for name, value in back.state_dict().items():
        assert torch.equal(value, state[name]), name
    report = str(fused_residual.convert_report(fused))
    assert "body [IntermediateLayerGetter]: fused bn1+relu" in report
    assert "body.layer2.0 [Bottleneck]: fused bn1+relu, bn2+relu, bn3+downsample.1+add+relu" in report
    assert "17 fully fused, 0 partly, 0 not; 49 patterns fused (53 norms), 0 norms left" in report
