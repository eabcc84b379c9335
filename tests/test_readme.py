"""README.md says what is true: every python block in it runs, and the claims it makes in prose
about convert() (hooks, other norm layers) and the quick start hold."""

from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path

import pytest
import torch

import fused_residual

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
# A block whose first line is this comment runs only where a CUDA GPU is visible.
NEEDS_GPU = "# needs a GPU"


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.DOTALL | re.MULTILINE)


PYTHON_BLOCKS = code_blocks("python")


def test_readme_has_python_blocks():
    assert len(PYTHON_BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_readme_python_block_runs(index, tmp_path, monkeypatch):
    source = PYTHON_BLOCKS[index]
    if source.startswith(NEEDS_GPU) and not torch.cuda.is_available():
        pytest.skip("this README block needs a CUDA GPU")
    for package in ("torchvision", "onnxruntime"):
        if package in source:
            pytest.importorskip(package)
    monkeypatch.chdir(tmp_path)  # files a block writes (deployment: .onnx, .pt2) go there
    exec(compile(source, f"README.md python block {index}", "exec"), {"__name__": "__readme__"})


def test_quick_start_commands_are_the_ones_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    commands = ['pip install -e ".[test]"', "python -m fused_residual", "pytest"]
    assert any(block.splitlines() == commands for block in code_blocks("bash")), code_blocks("bash")
    for command in commands:
        assert re.search(rf"^{re.escape(command)}$", ci, flags=re.MULTILINE), command


def _resnet18_with_hooks(names: list[str]) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18()
    seen: dict[str, torch.Tensor] = {}
    for name in names:
        def hook(module, args, out, name=name):
            seen[name] = out.detach()
        model.get_submodule(name).register_forward_hook(hook)
    return model, seen


def test_readme_hook_claims():
    """The README's "Hooks" paragraph, claim by claim."""
    # Hooks registered before convert(): those pairs and that shortcut stay unfused, every hook
    # fires on the value it saw in the unconverted model.
    names = ["relu", "bn1", "layer1.0.relu", "layer2.0.downsample.1", "layer3.0.bn1"]
    original, expected = _resnet18_with_hooks(names)
    model = copy.deepcopy(original)
    seen: dict[str, torch.Tensor] = {}
    for name in names:
        model.get_submodule(name)._forward_hooks.clear()
        model.get_submodule(name).register_forward_hook(
            lambda module, args, out, name=name: seen.__setitem__(name, out.detach()))
    old_relu = model.relu
    report = str(fused_residual.convert_report(model))
    assert "bn1: has module hooks" in report and "ReLU module relu has module hooks" in report, report
    fused_residual.convert(model)
    assert model.relu is old_relu and type(model.bn1) is torch.nn.BatchNorm2d
    assert type(model.layer2[0].downsample[1]) is torch.nn.BatchNorm2d
    assert type(model.layer3[0].bn1) is torch.nn.BatchNorm2d
    assert isinstance(model.layer3[0].bn2, fused_residual.BatchNormAddReLU2d)  # the rest fuses
    x = torch.randn(2, 3, 32, 32)
    original.eval(), model.eval()
    original(x), model(x)
    assert seen.keys() == expected.keys() == set(names)
    for name in names:
        torch.testing.assert_close(seen[name], expected[name], msg=name)

    # Hooks registered after convert(): a fused norm's hook sees its fused output.
    model, seen = _resnet18_with_hooks([])
    fused_residual.convert(model)
    for name in ["relu", "bn1", "layer1.0.relu", "layer1.0.bn1", "layer1.0.bn2", "layer1.0",
                 "layer2.0.bn2", "layer2.0", "layer1.0.conv1"]:
        model.get_submodule(name).register_forward_hook(
            lambda module, args, out, name=name: seen.__setitem__(name, out.detach()))
    model(torch.randn(2, 3, 32, 32))
    assert "layer1.0.relu" not in seen  # a fused block does not call its relu
    torch.testing.assert_close(seen["relu"], seen["bn1"])  # FoldedReLU returns its input
    assert seen["bn1"].min() >= 0 and seen["layer1.0.bn1"].min() >= 0  # post-ReLU
    torch.testing.assert_close(seen["layer1.0.bn2"], seen["layer1.0"])  # the block's output
    torch.testing.assert_close(seen["layer2.0.bn2"], seen["layer2.0"])  # hooked: shortcut as modules
    assert "layer1.0.conv1" in seen


def test_readme_norm_claims():
    """The norms convert() fuses (the convert() paragraph): models built with FrozenBatchNorm2d
    or nn.SyncBatchNorm fuse fully, as BatchNorm2d ones do, without a warning; a model of
    other norm layers is left as it is, with one RuntimeWarning saying nothing was fused."""
    torchvision = pytest.importorskip("torchvision")
    from torchvision.ops import FrozenBatchNorm2d

    frozen = torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d)
    sync = torch.nn.SyncBatchNorm.convert_sync_batchnorm(torchvision.models.resnet18())
    for model in (frozen, sync):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fused_residual.convert(model)
        report = fused_residual.convert_report(model)
        assert (report.fused, report.left) == (17, 0), report
    grouped = torchvision.models.resnet18(norm_layer=lambda c: torch.nn.GroupNorm(8, c))
    with pytest.warns(RuntimeWarning, match="fused nothing"):
        fused_residual.convert(grouped)
