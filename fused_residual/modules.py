"""Drop-in modules: `BatchNormAddReLU2d` and the seed block's fused twin `FusedResidualBlock`."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .autograd import BatchNormArgs
from .backends import check_backend_name
from .functional import bn_add_relu


class BatchNormAddReLU2d(nn.BatchNorm2d):
    """`relu(BatchNorm2d(input) + residual)` in one fused pass; `residual=None` gives BN + ReLU.

    A subclass of `nn.BatchNorm2d` with the same parameters, buffers, state_dict keys and
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
        *,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype)
        check_backend_name(backend)
        self.backend = backend

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:  # type: ignore[override]
        self._check_input_dim(input)
        args = batch_norm_call_args(self)
        if residual is not None and residual.dtype != input.dtype:
            residual = residual.to(input.dtype)
        return bn_add_relu(
            input,
            residual,
            args.running_mean,
            args.running_var,
            args.weight,
            args.bias,
            args.training,
            args.momentum,
            args.eps,
            backend=self.backend,
        )


def batch_norm_call_args(bn: nn.modules.batchnorm._BatchNorm) -> BatchNormArgs:
    """What `bn.forward` would pass to F.batch_norm, with its side effect: in training with
    running statistics, `num_batches_tracked` is incremented (and with `momentum=None` the
    factor is the cumulative average 1 / num_batches_tracked), exactly as
    nn.modules.batchnorm._BatchNorm.forward does. Batch statistics are used in training and
    when there are no running statistics; running statistics are updated (or read) unless
    the module is training without tracking them.
    """
    exponential_average_factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            exponential_average_factor = 1.0 / float(bn.num_batches_tracked)
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    keep_running = not bn.training or bn.track_running_stats
    return BatchNormArgs(
        bn.running_mean if keep_running else None,
        bn.running_var if keep_running else None,
        bn.weight,
        bn.bias,
        use_batch_stats,
        exponential_average_factor,
        bn.eps,
    )


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
