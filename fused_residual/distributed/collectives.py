"""The two collectives of a synchronized BatchNorm, as torch.distributed functional collectives.

Forward: every rank contributes one packed float64 row `[count, mean_1, M2_1, mean_2, M2_2, ...]`
(count = N·H·W of its batch, then per BatchNorm the per-channel mean and sum of squared
deviations M2 = biased var · count, from the backend's `bn_stats`); one `all_gather` gives every
rank the same (world, 1 + 2kC) matrix, rows in rank order, and each rank merges it with the same
ops (`merge_moments`), so the statistics are bitwise identical on every rank whatever the order
in which the rows arrived. Backward: one `all_reduce` (sum) of the packed per-channel sums.

Functional collectives (`torch.distributed._functional_collectives`) rather than the in-place
`dist.all_gather`: torch.compile traces them into the graph (no graph break), and in eager mode
they are the same c10d calls. The rows are float64 whatever the activation dtype: the count is
exact up to 2^53 (float32 would round counts above 2^24, e.g. 16 x 1024 x 2048 values per
channel), and the merge loses nothing; the tensors are (1 + 2kC) values, negligible next to
the activations.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

if dist.is_available():
    import torch.distributed._functional_collectives as funcol


class SyncGroup(NamedTuple):
    """The process group a synchronized BatchNorm reduces over: the group, its name (what the
    functional collectives and the autograd.Functions take) and its size."""

    group: dist.ProcessGroup
    name: str
    world_size: int


def sync_group(process_group: dist.ProcessGroup | None) -> SyncGroup | None:
    """The group a synchronized BatchNorm reduces over, or None when there is nothing to
    synchronize with: torch.distributed unavailable or not initialized, or a group of one rank
    (or one this rank is not in: world size -1, which nn.SyncBatchNorm also runs unsynchronized).
    `process_group=None` means the default (WORLD) group, as in nn.SyncBatchNorm."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = dist.group.WORLD if process_group is None else process_group
    world_size = dist.get_world_size(group)
    if world_size <= 1:
        return None
    return SyncGroup(group, group.group_name, world_size)


def pack_moments(count: int, moments: list[tuple[Tensor, Tensor]], num_norms: int, channels: int,
                 device: torch.device) -> Tensor:
    """This rank's row: [count, mean_1, M2_1, ...] in float64, M2 = biased var · count.

    `moments` holds each of the `num_norms` BatchNorms' (mean, biased var) from `bn_stats`; an
    empty batch (count 0, `moments` empty: the ops reject N·H·W = 0) contributes zeros, which
    the merge weighs by 0.
    """
    if count == 0:
        return torch.zeros(1 + 2 * num_norms * channels, dtype=torch.float64, device=device)
    parts = [torch.full((1,), count, dtype=torch.float64, device=device)]
    for mean, var in moments:
        parts += [mean.double(), var.double() * count]
    return torch.cat(parts)


def merge_moments(gathered: Tensor, num_norms: int, channels: int,
                  dtype: torch.dtype) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
    """Merge the all-gathered rows (world, 1 + 2kC) into the global count (0-d float64) and
    each BatchNorm's global (mean, biased var) in `dtype`.

    Chan, Golub & LeVeque's update of (count, mean, M2) for a union of parts, applied to all
    ranks at once: mean = Σ n_r mean_r / n and M2 = Σ (M2_r + n_r (mean_r - mean)²). Every
    term is non-negative (no E[x²] - E[x]² cancellation), the rows are in rank order, and the
    same ops run on every rank, so every rank gets bitwise the same statistics. An empty rank
    (n_r = 0) adds exactly nothing; when every rank is empty the statistics are 0 (never read:
    no rank applies them) rather than NaN.
    """
    counts = gathered[:, 0:1]
    total = counts.sum()
    divisor = total.clamp(min=1)
    merged = []
    for i in range(num_norms):
        means = gathered[:, 1 + 2 * i * channels: 1 + (2 * i + 1) * channels]
        m2s = gathered[:, 1 + (2 * i + 1) * channels: 1 + (2 * i + 2) * channels]
        mean = (counts * means).sum(dim=0) / divisor
        spread = torch.where(counts > 0, counts * (means - mean) ** 2, torch.zeros_like(means))
        var = (m2s + spread).sum(dim=0) / divisor
        merged.append((mean.to(dtype), var.to(dtype)))
    return total, merged


def all_gather_rows(row: Tensor, group_name: str, world_size: int) -> Tensor:
    """The one forward collective: every rank's row, stacked in rank order."""
    # The native functional op, not funcol.all_gather_single (torch >= 2.12 only) nor
    # all_gather_tensor (deprecated there): the same traceable op on every supported torch.
    gathered = torch.ops._c10d_functional.all_gather_into_tensor(row, world_size, group_name)
    return torch.ops._c10d_functional.wait_tensor(gathered).view(world_size, -1)


def all_reduce_mean_sums(sums: list[Tensor], total: Tensor, group_name: str) -> list[Tensor]:
    """The one backward collective: the per-channel sums of every rank added up (in float64),
    each divided by the global count, returned in the sums' dtype."""
    packed = torch.cat([s.double() for s in sums])
    reduced = funcol.wait_tensor(funcol.all_reduce(packed, "sum", group_name))
    means = (reduced / total.clamp(min=1)).split([s.numel() for s in sums])
    return [m.to(s.dtype) for m, s in zip(means, sums, strict=True)]


def update_running_stats(mean: Tensor, var: Tensor, total: Tensor, running_mean: Tensor,
                         running_var: Tensor, momentum: float) -> None:
    """`bn_update_running_stats` with the global count as a tensor: the count arrived with the
    gathered statistics, and reading it on the host would synchronize a GPU with the CPU and
    break a torch.compile graph. Same math (computed in mean's dtype, stored in the running
    stats' dtype): running_var takes the variance unbiased over the global count, as
    nn.SyncBatchNorm does. With no values on any rank the running statistics stay as they are.
    """
    acc = mean.dtype
    unbias = (total / (total - 1)).to(acc)
    new_mean = (1 - momentum) * running_mean.to(acc) + momentum * mean
    new_var = (1 - momentum) * running_var.to(acc) + momentum * var * unbias
    has_values = total > 0
    running_mean.copy_(torch.where(has_values, new_mean, running_mean.to(acc)))
    running_var.copy_(torch.where(has_values, new_var, running_var.to(acc)))


DOUBLE_BACKWARD_ERROR = (
    "fused_residual: second derivatives of a synchronized BatchNorm (backward with "
    "create_graph=True while synchronizing across processes) are not supported: the backward's "
    "all_reduce is not differentiable. Compute them without synchronization (eval mode, or a "
    "process group of one rank)."
)


def refuse_double_backward() -> None:
    """Called first in a synchronized backward: with create_graph=True (grad mode on in the
    backward) raise, on every rank alike and before any collective, rather than return a
    graph that would miss the other ranks' terms (or a once_differentiable graph that
    `autograd.grad(..., allow_unused=True)` would read as zeros)."""
    if torch.is_grad_enabled():
        raise RuntimeError(DOUBLE_BACKWARD_ERROR)

