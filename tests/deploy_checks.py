"""Shared by the deployment tests (test_export.py, test_onnx.py): converted models with their
original and float64 twins, a module that calls the fused ops directly (as a data-flow
rewritten forward may), and a fresh Python process in which fused_residual cannot be
imported."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from bounds import Norm, bn_add_relu_bounds, dual_bounds
from helpers import DEVICE

import fused_residual

ROOT = Path(__file__).resolve().parent.parent

# Makes `import fused_residual` (and any submodule) fail in the process that runs it, whatever
# its sys.path or editable installs hold.
BLOCK_IMPORT = """
import sys

class _NoFusedResidual:
    def find_spec(self, name, path=None, target=None):
        if name == "fused_residual" or name.startswith("fused_residual."):
            raise ModuleNotFoundError(f"{name} is not importable in this process")
        return None

sys.meta_path.insert(0, _NoFusedResidual())
"""


def run_python(code: str, cwd: Path, *, without_fused_residual: bool) -> str:
    """Run `code` in a fresh interpreter; `without_fused_residual`: the import is blocked and
    the script must end with fused_residual never imported. Returns its stdout and stderr."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if without_fused_residual:
        code = BLOCK_IMPORT + code + "\nassert not any(m.startswith('fused_residual') for m in sys.modules)\n"
    else:
        env["PYTHONPATH"] = str(ROOT)  # this tree's fused_residual, not another install
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout + proc.stderr


def converted(arch: str, backend: str = "auto", seed: int = 0):
    """(converted model, original, float64 original) of a torchvision arch, norms randomized;
    ImageNet's 1000 classes, so that a batch's logits are enough values for the whole-model
    rule (tests/helpers.py `assert_model_output_within_rule`)."""
    import torchvision
    from model_checks import randomize_norms

    torch.manual_seed(seed)
    original = randomize_norms(getattr(torchvision.models, arch)(num_classes=1000)).to(DEVICE)
    fused = fused_residual.convert(copy.deepcopy(original), backend=backend)
    return fused, original, copy.deepcopy(original).double()


def fused_targets(graph: torch.fx.Graph) -> set[str]:
    return {str(n.target) for n in graph.nodes if "fused_residual" in str(n.target)}


class DirectOps(nn.Module):
    """An eval forward that calls the extension's (or the Triton backend's: `prefix`) ops
    itself: relu(bn1(x) + r), then relu(bn2(that) + bn3(x))."""

    def __init__(self, channels: int, prefix: str = "") -> None:
        super().__init__()
        self.bn1, self.bn2, self.bn3 = (nn.BatchNorm2d(channels, device=DEVICE) for _ in range(3))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for bn in (self.bn1, self.bn2, self.bn3):
                for t, v in ((bn.weight, 0.5), (bn.bias, -0.5), (bn.running_mean, 0.2),
                             (bn.running_var, 0.5)):
                    t.copy_(torch.rand(channels, generator=g) + v)
        ops = torch.ops.fused_residual
        self.apply_op = getattr(ops, prefix + "bn_apply").default
        self.dual_op = getattr(ops, prefix + "bn_dual_apply").default
        self.eval()

    def forward(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        b1, b2, b3 = self.bn1, self.bn2, self.bn3
        y, _ = self.apply_op(x, r, b1.running_mean, b1.running_var, b1.weight, b1.bias, b1.eps, False)
        z, _ = self.dual_op(y, b2.running_mean, b2.running_var, b2.weight, b2.bias, x, b3.running_mean,
                            b3.running_var, b3.weight, b3.bias, b2.eps, b3.eps, False)
        return z

    def unfused(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """The same computation in nn modules (eval)."""
        y = torch.relu(self.bn1(x) + r)
        return torch.relu(self.bn2(y) + self.bn3(x))

    def output_bound(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """The derived bound (tests/bounds.py) of the forward's output in x's dtype: the dual
        tail's own, plus the first tail's error carried through bn2 (in eval a per-channel
        scaling by |w2| / sqrt(var2 + eps); the ReLUs are 1-Lipschitz)."""
        def norm(bn: nn.BatchNorm2d, t: torch.Tensor) -> Norm:
            w, b, rm, rv = (p.detach().double() for p in (bn.weight, bn.bias, bn.running_mean,
                                                           bn.running_var))
            return Norm(t.double(), w, b, rm, rv, False, 0.1, bn.eps)

        first = norm(self.bn1, x)
        y_err = bn_add_relu_bounds(x, r, first.weight, first.bias, first.running_mean, first.running_var,
                                   False, 0.1, self.bn1.eps)["output"]
        y = torch.relu(F.batch_norm(first.x, first.running_mean, first.running_var, first.weight, first.bias,
                                    False, 0.0, first.eps) + r.double())
        second = norm(self.bn2, y)
        gain = second.weight.abs() * (second.running_var + self.bn2.eps).rsqrt()
        carried = gain.view(1, -1, 1, 1) * y_err
        return dual_bounds(second, norm(self.bn3, x), x.dtype)["output"] + carried
