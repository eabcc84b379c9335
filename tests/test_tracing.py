"""A converted model traces: torch.fx.symbolic_trace, torchvision's create_feature_extractor
(torch.fx, how FPN features are pulled out of backbones) and torch.export, giving the
features and outputs of the converted model and, under the tolerance rule, of the original.

torch.fx records each fused op as one call (`fused_norm_forward`, `fused_dual_forward`,
registered with torch.fx.wrap) and bakes train/eval mode into the graph, as it does for any
`if self.training`; create_feature_extractor traces a train and an eval graph.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import DEVICE, FUSED_BACKENDS, assert_within_rule, is_slow

import fused_residual

tv = pytest.importorskip("torchvision")
from model_checks import randomize_norms  # noqa: E402
from torchvision.models.feature_extraction import create_feature_extractor  # noqa: E402

BACKEND = next((b for b in FUSED_BACKENDS if not is_slow(b)), "reference")
NODES = {"layer1": "c2", "layer2": "c3", "layer3": "c4", "layer4": "c5"}


def models(arch: str = "resnet50"):
    torch.manual_seed(0)
    original = randomize_norms(getattr(tv.models, arch)(num_classes=10)).to(DEVICE)
    return fused_residual.convert(copy.deepcopy(original), backend=BACKEND), original


def graph_targets(gm: torch.fx.GraphModule) -> str:
    return " ".join(str(n.target) for n in gm.graph.nodes)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_symbolic_trace(training):
    fused, _ = models("resnet18")
    fused.train(training)
    gm = torch.fx.symbolic_trace(copy.deepcopy(fused))
    targets = graph_targets(gm)
    assert targets.count("fused_norm_forward") == 1 + 8 * 2 - 3
    assert targets.count("fused_dual_forward") == 3
    x = torch.randn(2, 3, 64, 64, device=DEVICE)
    # The same ops in the same order: the same bits, and the same running-stat updates.
    assert torch.equal(gm(x), fused(x))
    state = fused.state_dict()
    assert set(gm.state_dict()) == set(state)
    for name, value in gm.state_dict().items():
        assert torch.equal(value, state[name]), name


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_create_feature_extractor_resnet(training):
    """C2..C5 of a converted resnet50 through create_feature_extractor: the converted model's
    own features (bitwise) and the original's under the rule (eval: 64x64; train: batch
    statistics over few values in layer4, so 96x96)."""
    fused, original = models()
    truth = copy.deepcopy(original).double()
    size = 96 if training else 64
    x = torch.randn(2, 3, size, size, device=DEVICE)
    extractors = [create_feature_extractor(m.train(training), NODES) for m in (fused, original, truth)]
    reference = copy.deepcopy(fused)
    seen = {}
    for name, module in reference.named_children():
        if name in NODES:
            module.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(NODES[name], o))
    with torch.no_grad():
        got, want, exact = extractors[0](x), extractors[1](x), extractors[2](x.double())
        reference(x)
    assert list(got) == list(NODES.values())
    for key, value in exact.items():
        assert torch.equal(got[key], seen[key]), key
        assert_within_rule(key, got[key], want[key], value, torch.float32)


def test_create_feature_extractor_frozen_detection_body():
    """The FrozenBatchNorm2d body of a converted detection backbone, as torchvision's
    BackboneWithFPN wraps it: the features under the rule."""
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    original = randomize_norms(resnet_fpn_backbone(backbone_name="resnet50", weights=None,
                                                   norm_layer=FrozenBatchNorm2d, trainable_layers=3))
    original = original.to(DEVICE).eval()
    truth = copy.deepcopy(original).double()
    fused = fused_residual.convert(copy.deepcopy(original), backend=BACKEND)
    nodes = {"body.layer2": "c3", "body.layer4": "c5", "fpn": "fpn"}
    x = torch.randn(2, 3, 64, 64, device=DEVICE)
    with torch.no_grad():
        got, want, exact = (create_feature_extractor(m, nodes)(xx) for m, xx in
                            ((fused, x), (original, x), (truth, x.double())))
    assert_within_rule("c3", got["c3"], want["c3"], exact["c3"], torch.float32)
    assert_within_rule("c5", got["c5"], want["c5"], exact["c5"], torch.float32)
    for key in exact["fpn"]:
        assert_within_rule(f"fpn {key}", got["fpn"][key], want["fpn"][key], exact["fpn"][key], torch.float32)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_torch_export(training):
    """torch.export of a converted resnet18: the fused ops in the exported graph (no aten
    batch norm), the converted model's output, and in training the same running-stat
    updates."""
    fused, _ = models("resnet18")
    fused.train(training)
    x = torch.randn(2, 3, 64, 64, device=DEVICE)
    exported = torch.export.export(copy.deepcopy(fused), (x,))
    code = exported.graph_module.code
    assert "fused_residual.bn_apply" in code and "fused_residual.bn_dual_apply" in code
    assert "batch_norm" not in code
    assert ("fused_residual.bn_stats" in code) == training
    module = exported.module()
    out = module(x)
    want = fused(x)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    if training:
        state = fused.state_dict()
        for name, value in module.state_dict().items():
            torch.testing.assert_close(value, state[name], rtol=1e-6, atol=1e-7, msg=name)


def test_timm_partly_fused_traces():
    """A converted timm seresnet50 (SE tails left unfused, the rest fused) through
    create_feature_extractor in eval: the original's features under the rule."""
    timm = pytest.importorskip("timm", reason="timm is not installed (the `timm` extra)")
    torch.manual_seed(0)
    original = randomize_norms(timm.create_model("seresnet50", pretrained=False, num_classes=10))
    original = original.to(DEVICE).eval()
    truth = copy.deepcopy(original).double()
    fused = fused_residual.convert(copy.deepcopy(original), backend=BACKEND)
    x = torch.randn(2, 3, 64, 64, device=DEVICE)
    with torch.no_grad():
        got, want, exact = (create_feature_extractor(m, NODES)(xx) for m, xx in
                            ((fused, x), (original, x), (truth, x.double())))
    for key, value in exact.items():
        assert_within_rule(key, got[key], want[key], value, torch.float32)
