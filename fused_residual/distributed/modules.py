"""`SyncBatchNormAddReLU2d` (an nn.SyncBatchNorm with the fused add + ReLU tail) and
`convert_sync_batchnorm`, which turns this package's BatchNorms into it in place."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from ..backends import check_backend_name
from ..functional import bn_add_relu
from ..modules import BatchNormAddReLU2d, FusedNorm, NormState, batch_norm_state, fused_call_args
from .functional import sync_bn_add_relu


@torch.fx.wrap
def fused_sync_norm_forward(input: Tensor, residual: Tensor | None, state: NormState, backend: str,
                            process_group: dist.ProcessGroup | None) -> Tensor:
    """relu(sync_batch_norm(input) + residual) for a synchronized norm in `state`: synchronized
    over `process_group` in training (nn.SyncBatchNorm's rule: eval mode never synchronizes),
    else the single-device fused op. torch.fx records it as one call."""
    if input.dim() >= 2 and input.size(1) == 0:  # nn.SyncBatchNorm's own check and message
        raise ValueError("SyncBatchNorm number of input channels should be non-zero")
    args = fused_call_args(input, residual, state)
    if state.training:
        return sync_bn_add_relu(*args, process_group=process_group, backend=backend)
    return bn_add_relu(*args, backend=backend)


class SyncBatchNormAddReLU2d(FusedNorm, nn.SyncBatchNorm):
    """`relu(SyncBatchNorm(input) + residual)`, fused; `residual=None` gives SyncBatchNorm + ReLU.

    A subclass of `nn.SyncBatchNorm` with the same parameters, buffers, state_dict keys and
    `process_group` semantics (None: the WORLD group). In training with an initialized process
    group of more than one rank, the batch statistics are those of every rank's batch (one
    all_gather per forward, one all_reduce per backward; see `sync_bn_add_relu`), and every
    rank of the group must call it. In eval mode, without an initialized process group, or in
    a group of one rank, it runs exactly the single-device fused op (`bn_add_relu`, as
    `BatchNormAddReLU2d`) with no collective. Unlike nn.SyncBatchNorm it synchronizes CPU
    tensors too (gloo). Input must be 4-D (N, C, H, W); the residual is cast to the input's
    dtype, as an in-place `out += identity` does under autocast. `fused_residual.convert`
    makes the nn.SyncBatchNorm layers of the blocks and stems it fuses into this class.
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

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"

    def norm_state(self) -> NormState:
        return batch_norm_state(self)

    @classmethod
    def run(cls, module: nn.Module, input: Tensor, residual: Tensor | None, backend: str) -> Tensor:
        return fused_sync_norm_forward(input, residual, cls.norm_state(module), backend,
                                       module.process_group)


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
    own forward are left alone, and so are FrozenBatchNorm2d and its fused twin (frozen: there is
    nothing to synchronize), as torch's convert_sync_batchnorm leaves FrozenBatchNorm2d.

    On a model made by `fused_residual.convert` (torchvision, timm, FrozenBatchNorm2d detection
    bodies) this gives the fused, synchronized model: the fused parts synchronize, a
    downsampling block's dual tail synchronizes both its BatchNorms in one collective each way
    (both now share `process_group`), and the parts convert() left run as nn.SyncBatchNorm.
    Calling it before `convert` gives the same model. Raises TypeError for a non-Module.
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
