"""torchvision's FrozenBatchNorm2d and its fused twin `FrozenBatchNormAddReLU2d` (the modules
layer: `_norms.py` lists it as a norm kind, `convert` fuses it by data flow like any other).

FrozenBatchNorm2d (detection and segmentation backbones) is an eval-mode BatchNorm of four
buffers and `eps`; its fused twin runs the eval-mode fused op, differentiable with respect
to the input and the residual only (weight and bias are buffers).

This module imports torchvision; `_norms` imports it on first use, when torchvision is
installed, so that `import fused_residual` does not. It imports nothing of the convert layer.
"""

from __future__ import annotations

from torchvision.ops.misc import FrozenBatchNorm2d

from .backends import check_backend_name
from .modules import FusedNorm, NormState, module_tensors


def frozen_batch_norm_state(bn: FrozenBatchNorm2d) -> NormState:
    """FrozenBatchNorm2d is always an eval-mode BatchNorm of its buffers."""
    weight, bias, mean, var = module_tensors(bn, "weight", "bias", "running_mean", "running_var")
    return NormState(weight, bias, mean, var, None, False, True, 0.0, bn.eps)


class FrozenBatchNormAddReLU2d(FusedNorm, FrozenBatchNorm2d):
    """torchvision's FrozenBatchNorm2d with `forward(input, residual=None)` =
    relu(frozen_bn(input) + residual) in one fused op (same buffers and state_dict keys)."""

    def __init__(self, num_features: int, eps: float = 1e-5, *, backend: str = "auto") -> None:
        super().__init__(num_features, eps)
        check_backend_name(backend)
        self.backend = backend

    def norm_state(self) -> NormState:
        return frozen_batch_norm_state(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.weight.shape[0]}, eps={self.eps}, backend={self.backend!r})"
