"""Drop-in modules: `BatchNormAddReLU2d` and the seed block's fused twin `FusedResidualBlock`.

A fused norm module reads its tensors and options into a `NormState` (attribute reads only)
and hands it to `fused_norm_forward`, which does the rest: the `num_batches_tracked` update,
the momentum factor, the dtype cast of the residual and the fused op. `fused_norm_forward` is
registered with `torch.fx.wrap`, so torch.fx (and torchvision's `create_feature_extractor`)
records it as one call instead of tracing through its data-dependent Python (the 4-D check,
`float(num_batches_tracked)`, the autograd choice); torch.export and torch.compile trace
through it as ordinary Python.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
from torch import Tensor

from .autograd import BatchNormArgs
from .backends import check_backend_name
from .functional import bn_add_relu


class NormState(NamedTuple):
    """A BatchNorm-like module's tensors and options, as read from its attributes.

    A NamedTuple (not a dataclass) so that torch.fx can record it as a call argument.
    `num_batches_tracked` None means no counter (FrozenBatchNorm2d, or no running stats).
    """

    weight: Tensor | None
    bias: Tensor | None
    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None
    training: bool
    track_running_stats: bool
    momentum: float | None
    eps: float


def module_tensors(module: nn.Module, *names: str) -> list[Tensor | None]:
    """`getattr(module, name)` for each name, read from the module's parameter and buffer
    dicts where the name is there. Why: nn.Module keeps parameters and buffers out of the
    instance dict, so each attribute read runs nn.Module.__getattr__, a Python function of
    about 7K instructions (callgrind, torch 2.14); five of them were half of a fused module's
    host overhead over nn.BatchNorm2d's. A name not in either dict (a parametrization's
    property, a plain attribute) is read with getattr, as before."""
    params, buffers = module._parameters, module._buffers
    return [params[n] if n in params else buffers[n] if n in buffers else getattr(module, n) for n in names]


def batch_norm_state(bn: nn.modules.batchnorm._BatchNorm) -> NormState:
    """The state of an nn.BatchNorm2d (or subclass)."""
    weight, bias, mean, var, count = module_tensors(bn, "weight", "bias", "running_mean", "running_var",
                                                    "num_batches_tracked")
    return NormState(weight, bias, mean, var, count, bn.training, bn.track_running_stats, bn.momentum, bn.eps)


def norm_call_args(state: NormState) -> BatchNormArgs:
    """What nn.BatchNorm2d's forward would pass to F.batch_norm, with its side effect: in
    training with running statistics, `num_batches_tracked` is incremented (and with
    `momentum=None` the factor is the cumulative average 1 / num_batches_tracked), exactly as
    nn.modules.batchnorm._BatchNorm.forward does. Batch statistics are used in training and
    when there are no running statistics; running statistics are updated (or read) unless
    the module is training without tracking them.
    """
    factor = 0.0 if state.momentum is None else state.momentum
    if state.training and state.track_running_stats and state.num_batches_tracked is not None:
        state.num_batches_tracked.add_(1)
        if state.momentum is None:
            factor = 1.0 / float(state.num_batches_tracked)
    use_batch_stats = state.training or (state.running_mean is None and state.running_var is None)
    keep_running = not state.training or state.track_running_stats
    return BatchNormArgs(
        state.running_mean if keep_running else None,
        state.running_var if keep_running else None,
        state.weight,
        state.bias,
        use_batch_stats,
        factor,
        state.eps,
    )


def check_4d(input: Tensor) -> None:
    """nn.BatchNorm2d's own input check, with its message."""
    if input.dim() != 4:
        raise ValueError(f"expected 4D input (got {input.dim()}D input)")


def fused_call_args(input: Tensor, residual: Tensor | None, state: NormState) -> tuple:
    """The positional arguments of `bn_add_relu` for a norm module's fused forward: the 4-D
    check, the residual cast to the input's dtype (as an in-place `out += identity` does under
    autocast) and `norm_call_args` (with its `num_batches_tracked` update)."""
    check_4d(input)
    if residual is not None and residual.dtype != input.dtype:
        residual = residual.to(input.dtype)
    a = norm_call_args(state)
    return (input, residual, a.running_mean, a.running_var, a.weight, a.bias, a.training, a.momentum, a.eps)


@torch.fx.wrap
def fused_norm_forward(input: Tensor, residual: Tensor | None, state: NormState, backend: str) -> Tensor:
    """relu(norm(input) + residual) for a norm in `state` (residual None: norm + ReLU)."""
    return bn_add_relu(*fused_call_args(input, residual, state), backend=backend)


class FusedNorm:
    """Mixin of the fused norm modules: `forward(input, residual=None)` is
    relu(norm(input) + residual) in one fused op, from the subclass's `norm_state()` and its
    `backend` attribute (set by `convert`)."""

    backend: str

    def norm_state(self) -> NormState:
        raise NotImplementedError

    @classmethod
    def run(cls, module: nn.Module, input: Tensor, residual: Tensor | None, backend: str) -> Tensor:
        """The fused forward of `module`: an instance of this class, or of the plain class it
        fuses (what a fused block runs for a norm that lost its fused class, see `_blocks`)."""
        return fused_norm_forward(input, residual, cls.norm_state(module), backend)

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        return self.run(self, input, residual, self.backend)

    def __prepare_scriptable__(self) -> nn.Module:
        # torch.jit.script calls this on every submodule before it compiles anything.
        raise RuntimeError(
            f"torch.jit.script cannot compile {self!r}: fused_residual's fused modules run Python "
            f"(an autograd.Function, the backend choice) that TorchScript does not support. "
            f"Instead: torch.jit.trace(model.eval(), example) (records the unfused BatchNorm + add "
            f"+ ReLU, loads without fused_residual), torch.export.export (keeps the fused ops), "
            f"fused_residual.export_unfused (a torch.export program without them), or "
            f"fused_residual.unconvert(model) and then torch.jit.script.")


class BatchNormAddReLU2d(FusedNorm, nn.BatchNorm2d):
    """`relu(BatchNorm2d(input) + residual)` in one fused pass; `residual=None` gives BN + ReLU.

    A subclass of `nn.BatchNorm2d` that takes the installed torch's constructor arguments in
    the same positions (`bias=False` too, where that torch has it: a weight without a bias),
    plus the keyword `backend`, and has the same parameters, buffers, state_dict keys and
    semantics (`num_batches_tracked`, `momentum=None` cumulative averaging,
    `track_running_stats=False`, eval mode). The residual is cast to the input's dtype, as an
    in-place `out += identity` does under autocast.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        backend: str = "auto",
    ) -> None:
        # Only pass `bias` when it is not the default: torch versions whose nn.BatchNorm2d has
        # no `bias` argument then take every call they take, and reject bias=False as they do.
        extra = {} if bias is True else {"bias": bias}
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **extra)
        check_backend_name(backend)
        self.backend = backend

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"

    def norm_state(self) -> NormState:
        return batch_norm_state(self)


class FusedResidualBlock(nn.Module):
    """The seed `ResidualBlock` (shared/seed/residual_block.md) with its tails fused.

    Same submodules and state_dict keys (conv1, bn1, conv2, bn2, shortcut): bn1 + ReLU and
    bn2 + residual add + ReLU each run as one fused op. `stride > 1` downsamples: conv1 and a
    1x1 shortcut conv take the stride.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, *,
                 backend: str = "auto") -> None:
        super().__init__()
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, stride=stride)
        self.bn1 = BatchNormAddReLU2d(out_channels, backend=backend)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.bn2 = BatchNormAddReLU2d(out_channels, backend=backend)
        needs_projection = in_channels != out_channels or stride != 1
        self.shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride)
            if needs_projection
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        identity = self.shortcut(x)
        out = self.bn1(self.conv1(x))
        return self.bn2(self.conv2(out), identity)
