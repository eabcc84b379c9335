"""fused_residual.unconvert (issue 23, item 1): in place, every class convert() swapped goes
back (fused norms to their plain class, rewritten modules to their own class, FoldedReLU to
nn.ReLU) and every attribute it added goes away; Parameters, buffers, state_dict, hooks,
requires_grad flags and train/eval modes are what they were. So unconvert(convert(m)) runs
m's own forwards: it computes bitwise what an unconverted copy of m computes, also after
the converted model trained (its running statistics and weights are the model's own).

Round trips on torchvision, timm, detection (FrozenBatchNorm2d), SyncBatchNorm models (both
conversion orders, and torch's convert_sync_batchnorm after convert()), Hugging Face and
hand-written models, and through copy.deepcopy and torch.save / torch.load.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn as nn
from helpers import FUSED_BACKENDS, is_slow

import fused_residual

tv = pytest.importorskip("torchvision")
from model_checks import randomize_norms  # noqa: E402
from test_convert_dataflow import CifarResNet, primary, tiny_hf  # noqa: E402

BACKEND = next((b for b in FUSED_BACKENDS if not is_slow(b)), "reference")


def structure(model: nn.Module) -> list:
    """Every module's class, attributes (names), hooks (the hook objects), mode and flags."""
    def hooks(m: nn.Module) -> list:
        return [list(d.values()) for d in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks,
                                           m._backward_pre_hooks)]

    return [(name, type(m), sorted(m.__dict__), hooks(m), m.training,
             [(n, p.requires_grad) for n, p in m.named_parameters(recurse=False)])
            for name, m in model.named_modules()]


def train_step(model: nn.Module, x: torch.Tensor) -> tuple:
    model.zero_grad(set_to_none=True)
    out = primary(model(x))
    out.square().mean().backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    return out.detach(), [p.grad for p in model.parameters()]


def round_trip(model: nn.Module, x: torch.Tensor, run=train_step, **convert_kwargs) -> nn.Module:
    """convert, a training step, unconvert; then the structure and a step are the original's."""
    before = structure(model)
    params = [id(p) for p in model.parameters()]
    keys = list(model.state_dict())
    fused_residual.convert(model, backend=BACKEND, **convert_kwargs)
    assert fused_residual.convert_report(model).fused > 0
    run(model, x)  # the converted model trains: the weights and statistics move
    twin = copy.deepcopy(model)  # (a converted copy, unconverted below too)
    assert fused_residual.unconvert(model) is model
    assert structure(model) == before
    assert [id(p) for p in model.parameters()] == params and list(model.state_dict()) == keys
    original = fused_residual.unconvert(twin)
    assert structure(original) == before
    # The unconverted model and an unconverted copy: m's own code on the same state, bitwise.
    got, want = run(model, x), run(original, x)
    assert torch.equal(got[0], want[0])
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(got[1], want[1], strict=True))
    for (n, a), b in zip(model.state_dict().items(), original.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    return model


def hooked(model: nn.Module, names: list[str]) -> nn.Module:
    for name in names:
        model.get_submodule(name).register_forward_hook(lambda m, i, o: None)
        model.get_submodule(name).register_forward_pre_hook(lambda m, i: None)
    return model


X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def test_torchvision_resnet_with_hooks_and_modes():
    torch.manual_seed(0)
    model = randomize_norms(tv.models.resnet50(num_classes=10))
    hooked(model, ["layer1", "layer2.0.downsample", "layer3.1.bn2", "fc"])  # (layer3.1's tail is left)
    model.layer4.eval()
    model.layer1.requires_grad_(False)
    round_trip(model, X)
    assert type(model.layer3[1].bn2) is nn.BatchNorm2d and not model.layer4.training


@pytest.mark.parametrize("name", ["resnet50d", "seresnet50"])
def test_timm(name):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    round_trip(randomize_norms(timm.create_model(name, pretrained=False, num_classes=10)), X)


def test_detection_frozen_batch_norm():
    """Faster R-CNN's FrozenBatchNorm2d backbone, in eval mode (its training forward samples
    regions: the eval forward is deterministic)."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d,
                                   trainable_layers=3)  # as torchvision builds it for pretrained weights
    model = randomize_norms(FasterRCNN(backbone, num_classes=3, min_size=64, max_size=64)).eval()
    assert any(type(m) is FrozenBatchNorm2d for m in model.modules())
    images = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)]

    def run(m, _):
        with torch.no_grad():
            out = m(images)
        return torch.cat([o["boxes"].flatten() for o in out] + [o["scores"] for o in out]), []

    round_trip(model, images, run)


def test_sync_batch_norm_models():
    """nn.SyncBatchNorm before convert(); fused_residual.convert_sync_batchnorm after it (the
    fused norms become nn.SyncBatchNorm, the plain class of their kind); torch's
    convert_sync_batchnorm after it (new plain modules: nothing of theirs to undo)."""
    torch.manual_seed(0)
    base = randomize_norms(tv.models.resnet18(num_classes=10))
    round_trip(nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(base)), X)

    model = fused_residual.convert(copy.deepcopy(base), backend=BACKEND)
    fused_residual.convert_sync_batchnorm(model)
    fused_residual.unconvert(model)
    assert structure(model) == structure(nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(base)))

    model = fused_residual.convert(copy.deepcopy(base), backend=BACKEND)
    nn.SyncBatchNorm.convert_sync_batchnorm(model)
    fused_residual.unconvert(model)
    assert [type(m) for m in model.modules()] == \
        [type(m) for m in nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(base)).modules()]


def test_data_flow_models():
    """Hugging Face (children ending in a norm: nothing of theirs changed), a hand-written
    CIFAR ResNet (rewritten root and blocks), the seed block."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    round_trip(tiny_hf(transformers), X[:, :, :32, :32])
    round_trip(randomize_norms(CifarResNet()), X[:, :, :32, :32])
    round_trip(randomize_norms(fused_residual.seed.ResidualBlock(3, 8)), X[:, :, :16, :16])


def test_through_copies_and_files():
    """A deep copy and a torch.load of a converted model unconvert like the model."""
    torch.manual_seed(0)
    original = randomize_norms(tv.models.resnet18(num_classes=10))
    model = fused_residual.convert(copy.deepcopy(original), backend=BACKEND)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    expected = structure(original)
    for other in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        fused_residual.unconvert(other)
        assert structure(other) == expected
        with torch.no_grad():
            assert torch.equal(other.eval()(X), original.eval()(X))


def test_what_convert_did_not_make_stays():
    """Modules built fused stay fused; an unconverted model is unchanged; bad input."""
    block = fused_residual.FusedResidualBlock(4, 8)
    before = structure(block)
    with pytest.warns(RuntimeWarning, match="fused nothing"):  # it is fused by construction
        fused_residual.convert(block)
    fused_residual.unconvert(block)
    assert structure(block) == before and type(block.bn2) is fused_residual.BatchNormAddReLU2d
    model = tv.models.resnet18()
    before = structure(model)
    fused_residual.unconvert(model)
    assert structure(model) == before
    with pytest.raises(TypeError, match=r"nn\.Module"):
        fused_residual.unconvert(model.state_dict())
