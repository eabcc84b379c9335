"""`sync_bn_add_relu` and `sync_dual_bn_add_relu`: the fused tail with BatchNorm statistics
synchronized over a torch.distributed process group (the functional form of
`SyncBatchNormAddReLU2d`)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ..autograd import BatchNormArgs
from ..backends import resolve_backend
from ..checks import check_like_input
from ..functional import bn_add_relu, check_arguments, dual_bn_add_relu
from .autograd import SyncBatchNormAddReLU, SyncDualBatchNormAddReLU, sync_dual_forward, sync_forward
from .collectives import sync_group
from .reference import sync_batch_norm_reference


def _grad_wanted(tensors: tuple[Tensor | None, ...]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def sync_bn_add_relu(
    input: Tensor,
    residual: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    process_group: dist.ProcessGroup | None = None,
    backend: str = "auto",
) -> Tensor:
    """`bn_add_relu` with the training statistics of the batches of every rank of
    `process_group` (default: the WORLD group), as nn.SyncBatchNorm computes them.

    In training, with an initialized process group of more than one rank, every rank must call
    it (the same number of times, in the same order): the forward makes one all_gather, the
    backward one all_reduce when the input needs a gradient. A rank's batch may be empty, or
    hold other batch sizes than the other ranks'. The running variance is unbiased over the
    global count. Weight and bias gradients are this rank's (DistributedDataParallel averages
    them); the input gradient is that of the sum of every rank's loss. In eval mode, without an
    initialized process group, or with a group of one rank this is exactly `bn_add_relu`, with
    no collective. Second derivatives of a synchronized call raise a RuntimeError.
    """
    group = sync_group(process_group) if training else None
    if group is None:
        return bn_add_relu(input, residual, running_mean, running_var, weight, bias, training,
                           momentum, eps, backend=backend)
    check_arguments(input, residual, running_mean, running_var, weight, bias, True, eps,
                    synchronized=True)
    name = resolve_backend(backend, input.device.type)
    if name == "reference":
        out = sync_batch_norm_reference(input, running_mean, running_var, weight, bias, True,
                                        momentum, eps, group.group, group.world_size)
        return F.relu(out if residual is None else out + residual)
    if _grad_wanted((input, residual, weight, bias)):
        return SyncBatchNormAddReLU.apply(input, residual, weight, bias, running_mean, running_var,
                                          momentum, eps, name, group.name, group.world_size)
    # No gradient: the same ops and the one collective, without writing a mask.
    bn = BatchNormArgs(running_mean, running_var, weight, bias, True, momentum, eps)
    return sync_forward(name, input, residual, bn, group.name, group.world_size, save_mask=False)[0]


def sync_dual_bn_add_relu(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    input2: Tensor,
    running_mean2: Tensor | None,
    running_var2: Tensor | None,
    weight2: Tensor | None = None,
    bias2: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    training2: bool | None = None,
    momentum2: float | None = None,
    eps2: float | None = None,
    process_group: dist.ProcessGroup | None = None,
    backend: str = "auto",
) -> Tensor:
    """`dual_bn_add_relu` (two BatchNorms, one add, one ReLU: a downsampling block's tail) with
    both BatchNorms synchronized as in `sync_bn_add_relu`. Both BatchNorms' statistics travel in
    one all_gather and both BatchNorms' sums in one all_reduce. `training2`, `momentum2` and
    `eps2` default to the first BatchNorm's; a BatchNorm not in training uses its running
    statistics and is not synchronized.
    """
    training2 = training if training2 is None else training2
    momentum2 = momentum if momentum2 is None else momentum2
    eps2 = eps if eps2 is None else eps2
    group = sync_group(process_group) if training or training2 else None
    if group is None:
        return dual_bn_add_relu(input, running_mean, running_var, weight, bias, input2, running_mean2,
                                running_var2, weight2, bias2, training, momentum, eps,
                                training2=training2, momentum2=momentum2, eps2=eps2, backend=backend)
    check_arguments(input, None, running_mean, running_var, weight, bias, training, eps,
                    synchronized=True)
    check_like_input(input2, input, "input2")
    check_arguments(input2, None, running_mean2, running_var2, weight2, bias2, training2, eps2,
                    suffix="2", synchronized=True)
    name = resolve_backend(backend, input.device.type)
    if name == "reference":
        out = sync_batch_norm_reference(input, running_mean, running_var, weight, bias, training,
                                        momentum, eps, group.group, group.world_size)
        out2 = sync_batch_norm_reference(input2, running_mean2, running_var2, weight2, bias2,
                                         training2, momentum2, eps2, group.group, group.world_size)
        return F.relu(out + out2)
    tensors = (input, weight, bias, input2, weight2, bias2)
    if _grad_wanted(tensors):
        return SyncDualBatchNormAddReLU.apply(
            *tensors, running_mean, running_var, running_mean2, running_var2, training, training2,
            momentum, momentum2, eps, eps2, name, group.name, group.world_size,
        )
    return sync_dual_forward(
        name, input, BatchNormArgs(running_mean, running_var, weight, bias, training, momentum, eps),
        input2, BatchNormArgs(running_mean2, running_var2, weight2, bias2, training2, momentum2, eps2),
        group.name, group.world_size, save_mask=False,
    )[0]
