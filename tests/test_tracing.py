"""A converted model traces: torch.fx.symbolic_trace, torchvision's create_feature_extractor
(torch.fx, how FPN features are pulled out of backbones) and torch.export, giving the
features and outputs of the converted model; traced, the reference conversion gives the
original's features bit for bit, and every fused op a traced converted model runs meets its
derived bound (tests/model_checks.py).

torch.fx records each fused op as one call (`fused_norm_forward`, `fused_dual_forward`,
registered with torch.fx.wrap) and bakes train/eval mode into the graph, as it does for any
`if self.training`; create_feature_extractor traces a train and an eval graph.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import DEVICE, FUSED_BACKENDS, is_slow

import fused_residual

tv = pytest.importorskip("torchvision")
from model_checks import (  # noqa: E402
    FusedOpAudit,
    assert_identical,
    frozen_as_eval_batch_norm,
    randomize_norms,
)
from torchvision.models.feature_extraction import create_feature_extractor  # noqa: E402

BACKEND = next((b for b in FUSED_BACKENDS if not is_slow(b)), "reference")
NODES = {"layer1": "c2", "layer2": "c3", "layer3": "c4", "layer4": "c5"}


def models(arch: str = "resnet50"):
    torch.manual_seed(0)
    original = randomize_norms(getattr(tv.models, arch)(num_classes=10)).to(DEVICE)
    return fused_residual.convert(copy.deepcopy(original), backend=BACKEND), original


def check_traced(fused, original, nodes: dict[str, str], x: torch.Tensor, training: bool = False) -> dict:
    """Through create_feature_extractor in `training` mode: the reference conversion of
    `original` gives the original's features bit for bit (a frozen norm as F.batch_norm
    computes it), and every fused op of the traced `fused` meets its derived bound. Returns
    the traced fused model's features."""
    reference = fused_residual.convert(copy.deepcopy(original), backend="reference")
    baseline = frozen_as_eval_batch_norm(copy.deepcopy(original))
    with torch.no_grad():
        traced = [create_feature_extractor(m.train(training), nodes) for m in (reference, baseline)]
        assert_identical(traced[0](x), traced[1](x), "traced reference conversion")
        extractor = create_feature_extractor(fused.train(training), nodes)
        with FusedOpAudit() as audit:
            got = extractor(x)
    assert BACKEND == "reference" or audit.calls.get("apply", 0) > 0, audit.calls
    assert list(got) == list(nodes.values())
    return got


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
    own features (bitwise), and `check_traced`."""
    fused, original = models()
    x = torch.randn(2, 3, 64, 64, device=DEVICE)
    reference = copy.deepcopy(fused).train(training)
    seen = {}
    for name, module in reference.named_children():
        if name in NODES:
            module.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(NODES[name], o))
    with torch.no_grad():
        reference(x)
    got = check_traced(fused, original, NODES, x, training)
    for key, value in got.items():
        assert torch.equal(value, seen[key]), key


def test_create_feature_extractor_frozen_detection_body():
    """The FrozenBatchNorm2d body of a converted detection backbone, as torchvision's
    BackboneWithFPN wraps it: `check_traced` on its c3, c5 and FPN features."""
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    original = randomize_norms(resnet_fpn_backbone(backbone_name="resnet50", weights=None,
                                                   norm_layer=FrozenBatchNorm2d, trainable_layers=3))
    original = original.to(DEVICE).eval()
    fused = fused_residual.convert(copy.deepcopy(original), backend=BACKEND)
    got = check_traced(fused, original, {"body.layer2": "c3", "body.layer4": "c5", "fpn": "fpn"},
                       torch.randn(2, 3, 64, 64, device=DEVICE))
    assert list(got["fpn"]) == ["0", "1", "2", "3", "pool"]


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
    create_feature_extractor in eval: `check_traced`."""
    timm = pytest.importorskip("timm", reason="timm is not installed (the `timm` extra)")
    torch.manual_seed(0)
    original = randomize_norms(timm.create_model("seresnet50", pretrained=False, num_classes=10))
    original = original.to(DEVICE).eval()
    fused = fused_residual.convert(copy.deepcopy(original), backend=BACKEND)
    check_traced(fused, original, NODES, torch.randn(2, 3, 64, 64, device=DEVICE))
