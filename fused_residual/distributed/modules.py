"""`SyncBatchNormAddReLU2d` (an nn.SyncBatchNorm with the fused add + ReLU tail) and
`convert_sync_batchnorm`, which turns this package's BatchNorms into it in place."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from ..backends import check_backend_name
from ..functional import bn_add_relu
from ..modules import BatchNormAddReLU2d, batch_norm_state, norm_call_args
from .functional import sync_bn_add_relu


class SyncBatchNormAddReLU2d(nn.SyncBatchNorm):
    """`relu(SyncBatchNorm(input) + residual)`, fused; `residual=None` gives SyncBatchNorm + ReLU.

    A subclass of `nn.SyncBatchNorm` with the same parameters, buffers, state_dict keys and
    `process_group` semantics (None: the WORLD group). In training with an initialized process
    group of more than one rank, the batch statistics are those of every rank's batch (one
    all_gather per forward, one all_reduce per backward; see `sync_bn_add_relu`), and every
    rank of the group must call it. In eval mode, without an initialized process group, or in
    a group of one rank, it runs exactly the single-device fused op (`bn_add_relu`, as
    `BatchNormAddReLU2d`) with no collective. Unlike nn.SyncBatchNorm it synchronizes CPU
    tensors too (gloo). Input must be 4-D (N, C, H, W); the residual is cast to the input's
    dtype, as an in-place `out += identity` does under autocast.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: dist.ProcessGroup | None = None,
        *,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, process_group,
                         device=device, dtype=dtype)
        check_backend_name(backend)
        self.backend = backend

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:  # type: ignore[override]
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        args = norm_call_args(batch_norm_state(self))
        if residual is not None and residual.dtype != input.dtype:
            residual = residual.to(input.dtype)
        call = (input, residual, args.running_mean, args.running_var, args.weight, args.bias,
                args.training, args.momentum, args.eps)
        if self.training:  # as nn.SyncBatchNorm: eval mode never synchronizes
            return sync_bn_add_relu(*call, process_group=self.process_group, backend=self.backend)
        return bn_add_relu(*call, backend=self.backend)


_PLAIN_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def convert_sync_batchnorm(model: nn.Module, process_group: dist.ProcessGroup | None = None) -> nn.Module:
    """Synchronize every BatchNorm of `model` over `process_group` (None: the WORLD group), in
    place; returns `model`.

    `BatchNormAddReLU2d` becomes `SyncBatchNormAddReLU2d` (fused and synchronized, same
    backend); PyTorch's own BatchNorm1d/2d/3d become `nn.SyncBatchNorm`, as
    `nn.SyncBatchNorm.convert_sync_batchnorm` makes them; modules already synchronized take the
    new `process_group`. Like `fused_residual.convert`, only `__class__` is swapped (and
    `process_group` set): Parameters, buffers, hooks, requires_grad flags, train/eval mode and
    state_dict keys stay the same objects, so checkpoints load both ways. Subclasses with their
    own forward are left alone. Raises TypeError for a non-Module.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert_sync_batchnorm() expects an nn.Module, got {type(model).__name__}")
    for module in model.modules():
        cls = type(module)
        if cls in (BatchNormAddReLU2d, SyncBatchNormAddReLU2d):
            module.__class__ = SyncBatchNormAddReLU2d
        elif cls in _PLAIN_BATCHNORMS:
            module.__class__ = nn.SyncBatchNorm
        else:
            continue
        module.process_group = process_group
    return model
