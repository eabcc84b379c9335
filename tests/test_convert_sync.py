"""convert() with synchronized BatchNorms (nn.SyncBatchNorm, fused_residual.convert_sync_batchnorm),
in one process. Without a process group a synchronized norm runs exactly the single-device op,
so a synchronized converted model must give bitwise the results of the unsynchronized one.
The same models across processes (DDP on 2 ranks, both conversion orders, the dual tail's
groups, torch.compile) are checked in tests/sync_convert_checks.py, run by tests/test_sync.py.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import fused_residual
from fused_residual._blocks import FoldedReLU

tv = pytest.importorskip("torchvision")
from model_checks import FusedOpAudit, assert_identical, randomize_norms  # noqa: E402
from torchvision.ops.misc import FrozenBatchNorm2d  # noqa: E402

from fused_residual._torchvision import FrozenBatchNormAddReLU2d  # noqa: E402

# The models run on CPU: the C++ kernels where built (the fused ops are counted), else the reference.
BACKEND = "extension" if "extension" in fused_residual.available_backends("cpu") else "reference"
SyncFused = fused_residual.SyncBatchNormAddReLU2d
GROUP = object()  # stands for a process group: stored as given, never used without one


class FusedOpCounter(TorchDispatchMode):
    """Counts the extension's fused ops dispatched while active, by name (bn_apply, ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fused_residual":
            self.calls[func._opname] = self.calls.get(func._opname, 0) + 1
        return func(*args, **(kwargs or {}))


def resnet18(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return randomize_norms(tv.models.resnet18(num_classes=10, **kwargs)).train()


def train_step(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.square().sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def assert_same_step(model: nn.Module, other: nn.Module, x: torch.Tensor) -> None:
    """One training step of each: bitwise the same output, gradients and buffers."""
    out, grads = train_step(model, x)
    want, want_grads = train_step(other, x)
    assert torch.equal(out, want)
    assert grads.keys() == want_grads.keys()
    for name, g in grads.items():
        assert torch.equal(g, want_grads[name]), name
    for (name, b), c in zip(model.named_buffers(), other.buffers(), strict=True):
        assert torch.equal(b, c), name


def reference_twin(model: nn.Module) -> nn.Module:
    """A copy of `model` whose fused parts run the reference backend (eager PyTorch), nothing
    else changed, and whose synchronized norms are unsynchronized (in one process, without a
    process group, the same function: test_sync_batchnorm_then_convert checks that bit for
    bit). convert() records a backend on each fused norm and, for plain norms that a fused
    block keeps fused, on the block (`_fused_norms`)."""
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if type(m) is SyncFused:
            m.__class__ = fused_residual.BatchNormAddReLU2d
        elif type(m) is nn.SyncBatchNorm:
            m.__class__ = nn.BatchNorm2d
        if isinstance(getattr(m, "backend", None), str):
            m.backend = "reference"
        if isinstance(getattr(m, "_fused_norms", None), dict):
            m._fused_norms = dict.fromkeys(m._fused_norms, "reference")
    # Rewritten forwards hold their backend in their call sites: converting again re-plans
    # them with the reference backend. (A dual tail left unfused because only one of its norms
    # was synchronized may fuse in the twin: with the reference backend that is the original's
    # computation all the same.)
    return fused_residual.convert(twin, backend="reference")


def assert_like_original(model: nn.Module, original: nn.Module, x: torch.Tensor) -> None:
    """A training step of `model` computes the original's (tests/model_checks.py): its
    `reference_twin` gives the original's output, gradients and buffers bit for bit (and runs
    no fused op: else the twin missed a backend convert() records), and every fused op of
    `model` meets its derived bound."""
    def run(m):
        out, grads = train_step(m, x)
        return out, grads, dict(m.named_buffers())

    twin = reference_twin(model)
    with FusedOpAudit() as audit:
        twin_results = run(twin)
    assert not audit.calls, f"the reference twin ran fused ops: {audit.calls}"
    assert_identical(twin_results, run(copy.deepcopy(original)), "reference twin")
    with FusedOpAudit() as audit:
        run(copy.deepcopy(model))
    assert BACKEND == "reference" or audit.calls.get("apply", 0) + audit.calls.get("dual_apply", 0) > 0


def fused_counts(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    with FusedOpCounter() as counter:
        model(x)
    return counter.calls


X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
DUAL_LABEL = "bn2+downsample.1+add+relu"


def test_sync_batchnorm_then_convert():
    """torch's convert_sync_batchnorm first, then convert(): every block and the stem fuse
    into SyncBatchNormAddReLU2d (process_group kept), the downsampling tails into the
    synchronized dual op (both norms share the group); the same keys, and without a process
    group bitwise the unsynchronized converted model."""
    original = resnet18()
    keys = list(original.state_dict())
    model = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(original), process_group=GROUP)
    fused_residual.convert(model, backend=BACKEND)
    report = fused_residual.convert_report(model)
    assert (report.fused, report.left) == (17, 0) and str(report).count(DUAL_LABEL) == 3, report
    assert type(model.bn1) is SyncFused and model.bn1.process_group is GROUP
    assert type(model.layer2[0].bn2) is SyncFused and model.layer2[0].bn2.backend == BACKEND
    assert type(model.layer2[0].downsample[1]) is nn.SyncBatchNorm  # read by the dual op
    assert isinstance(model.relu, FoldedReLU) and list(model.state_dict()) == keys
    assert_same_step(model, fused_residual.convert(copy.deepcopy(original), backend=BACKEND), X)


def test_convert_then_sync_batchnorm_keeps_the_relu_and_the_fusion():
    """convert() first, then torch's convert_sync_batchnorm (which builds new, plain
    nn.SyncBatchNorm modules in place of the fused ones): the stem's ReLU is still applied
    (FoldedReLU), the blocks still run fused (their ReLU modules are not called), the keys
    are the same; convert() again fuses the stem too."""
    original = resnet18()
    keys = list(original.state_dict())
    model = fused_residual.convert(copy.deepcopy(original), backend=BACKEND)
    folded = model.relu
    nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert type(model.bn1) is type(model.layer1[0].bn1) is nn.SyncBatchNorm
    assert list(model.state_dict()) == keys
    called = []
    hook = model.layer1[0].relu.register_forward_hook(lambda *_: called.append(1))
    with torch.no_grad():
        copy.deepcopy(model)(X)  # (a copy: the statistics of `model` stay the original's)
    assert not called
    # Removed before assert_like_original, whose reference twin is converted again: convert()
    # leaves a part whose ReLU has hooks unfused, so the twin would call it.
    hook.remove()
    assert_like_original(model, original, X)
    if BACKEND != "reference":
        # The stem runs nn.SyncBatchNorm then the ReLU; 8 blocks: 16 fused parts, 3 of them dual
        # (two BatchNorms' statistics each). No process group here: the unsynchronized path,
        # one bn_train_forward per single-BatchNorm part.
        assert fused_counts(model, X) == {"bn_stats": 6, "bn_update_running_stats": 6, "bn_train_forward": 13,
                                          "bn_dual_apply": 3}
    fused_residual.convert(model, backend=BACKEND)
    assert type(model.bn1) is type(model.layer1[0].bn1) is SyncFused and model.relu is folded
    assert list(model.state_dict()) == keys
    plain = fused_residual.convert(copy.deepcopy(original), backend=BACKEND)
    plain.load_state_dict(model.state_dict())  # (the steps above moved the running statistics)
    assert_same_step(model, plain, X)


def test_folded_relu_is_applied_when_its_norm_is_not_fused():
    model = fused_residual.convert(resnet18(), backend=BACKEND)
    x = torch.randn(2, 64, 4, 4)
    assert torch.equal(model.relu(x), x)
    model.bn1 = nn.BatchNorm2d(64)  # replaced by hand: no longer fused
    assert torch.equal(model.relu(x), torch.relu(x))
    assert repr(model.relu) == "FoldedReLU(norm='bn1')"


def test_folded_relu_follows_copies_and_pickles():
    model = fused_residual.convert(resnet18(), backend=BACKEND)
    copied = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for m in (model, copied, loaded):
        assert m.relu._container is m and "relu._container" not in m.state_dict()
    nn.SyncBatchNorm.convert_sync_batchnorm(copied)  # only the copy loses its fused norms
    x = torch.randn(2, 64, 4, 4)
    assert torch.equal(model.relu(x), x) and torch.equal(copied.relu(x), torch.relu(x))


def test_convert_sync_batchnorm_of_converted_torchvision_models():
    """fused_residual.convert_sync_batchnorm on a converted resnet18: fused norms become
    SyncBatchNormAddReLU2d, the shortcut norms nn.SyncBatchNorm, all over the given group;
    every fused part stays fused (dual tails synchronized); same Parameters and keys; bitwise
    the unsynchronized model without a process group. FrozenBatchNorm2d stays as it is."""
    original = resnet18()
    plain = fused_residual.convert(copy.deepcopy(original), backend=BACKEND)
    model = fused_residual.convert(copy.deepcopy(original), backend=BACKEND)
    ids, keys = [id(p) for p in model.parameters()], list(model.state_dict())
    assert fused_residual.convert_sync_batchnorm(model, process_group=GROUP) is model
    assert type(model.bn1) is type(model.layer4[1].bn2) is SyncFused
    assert type(model.layer3[0].downsample[1]) is nn.SyncBatchNorm
    assert all(m.process_group is GROUP for m in model.modules() if isinstance(m, nn.SyncBatchNorm))
    assert [id(p) for p in model.parameters()] == ids and list(model.state_dict()) == keys
    report = fused_residual.convert_report(model)
    assert (report.fused, report.left) == (17, 0) and str(report).count(DUAL_LABEL) == 3, report
    if BACKEND != "reference":
        assert fused_counts(copy.deepcopy(model), X)["bn_dual_apply"] == 3
    assert_same_step(model, plain, X)

    frozen = fused_residual.convert(resnet18(norm_layer=FrozenBatchNorm2d), backend=BACKEND)
    before = {n: type(m) for n, m in frozen.named_modules()}
    fused_residual.convert_sync_batchnorm(frozen)
    assert {n: type(m) for n, m in frozen.named_modules()} == before
    assert type(frozen.bn1) is FrozenBatchNormAddReLU2d


def test_convert_sync_batchnorm_of_a_converted_timm_model():
    """A timm ResNet with a deep stem, avg-pool shortcuts and one SE block (its tail left
    unfused): the fused parts synchronize and stay fused, the SE tail's norm becomes
    nn.SyncBatchNorm; bitwise the unsynchronized converted model without a process group."""
    pytest.importorskip("timm", reason="timm is not installed (the `timm` extra)")
    from timm.layers import create_attn
    from timm.models import resnet as timm_resnet

    torch.manual_seed(0)
    original = timm_resnet.ResNet(block=timm_resnet.BasicBlock, layers=(1, 1, 1, 1), num_classes=10,
                                  stem_type="deep", avg_down=True)
    original.layer3[0].se = create_attn("se", original.layer3[0].bn2.num_features)
    original = randomize_norms(original).train()
    plain = fused_residual.convert(copy.deepcopy(original), backend=BACKEND)
    model = fused_residual.convert_sync_batchnorm(fused_residual.convert(copy.deepcopy(original),
                                                                         backend=BACKEND))
    assert type(model.conv1[1]) is SyncFused and isinstance(model.conv1[2], FoldedReLU)
    assert type(model.layer3[0].bn2) is nn.SyncBatchNorm and type(model.layer3[0].bn1) is SyncFused
    assert str(fused_residual.convert_report(model)) == str(fused_residual.convert_report(plain))
    assert_same_step(model, plain, X)


@pytest.mark.parametrize("change", ["other group", "shortcut not synchronized", "shortcut in eval"])
def test_dual_tail_needs_both_norms_synchronized_alike(change):
    """A synchronized tail whose shortcut norm is not synchronized, synchronized over another
    group, or in another mode: that block runs the shortcut as modules and the single fused
    tail (2 dual ops left of 3), and computes what the original does."""
    original = resnet18()
    model = fused_residual.convert_sync_batchnorm(fused_residual.convert(copy.deepcopy(original),
                                                                         backend=BACKEND))
    for m in (model, original):
        shortcut = m.layer2[0].downsample[1]
        if change == "other group":
            shortcut.process_group = GROUP
        elif change == "shortcut not synchronized":
            shortcut.__class__ = nn.BatchNorm2d
        else:
            shortcut.eval()
    report = str(fused_residual.convert_report(model))
    assert "layer2.0 [BasicBlock]: fused bn1+relu, bn2+add+relu; left downsample.1: it is added to bn2 but " \
           "synchronized differently" in report, report
    assert report.count(DUAL_LABEL) == 2
    if BACKEND != "reference":
        assert fused_counts(copy.deepcopy(model), X)["bn_dual_apply"] == 2
    assert_like_original(model, original, X)


def test_synchronized_model_traces():
    """torch.fx records each synchronized fused op as one call (fused_sync_norm_forward,
    fused_dual_forward), and the traced model computes what the model does."""
    model = fused_residual.convert_sync_batchnorm(fused_residual.convert(resnet18(), backend=BACKEND))
    gm = torch.fx.symbolic_trace(copy.deepcopy(model))
    targets = " ".join(str(n.target) for n in gm.graph.nodes)
    assert targets.count("fused_sync_norm_forward") == 17 - 3 and targets.count("fused_dual_forward") == 3
    assert torch.equal(gm(X), model(X))
