"""Per-rank pieces of the synchronized-tail checks that tests/sync_worker.py runs in spawned
processes: the whole batch every rank builds identically (so each rank can run the
single-process ops on all of it), each rank's slice, a forward + backward runner that counts
the collectives it makes, and the comparison of a rank's synchronized results with a float64
truth on the whole batch under the bound derived from the computation (tests/bounds.py: any
summation order, any merge of the ranks' statistics), eager PyTorch reported beside it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from bounds import bn_add_relu_bounds, dual_bounds
from helpers import assert_within_bound, eager_computes_as_bounded, make_case, reference_with_relu_bits, to64
from test_dual import dual_norms, dual_reference_with_relu_bits
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

# Element tensors (a rank holds its rows) and per-channel parameters (a rank holds its own
# gradient; their sum over ranks is the whole batch's gradient).
ELEMENT_KEYS = ("input", "residual", "input2")
PARAM_KEYS = ("weight", "bias", "weight2", "bias2")


class CollectiveCounter(TorchDispatchMode):
    """Records every c10d collective dispatched while active (in-place `dist.*` calls and
    functional collectives alike; waits and autograd wrappers are not collectives)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._opname
        if func.namespace in ("c10d", "_c10d_functional") and name not in (
                "wait_tensor", "_wrap_tensor_autograd"):
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


@contextmanager
def agreed(device: torch.device, group: dist.ProcessGroup | None = None) -> Iterator[None]:
    """Assertions that every rank of `group` fails together: the ranks exchange a flag before
    raising, so that no rank runs on into a collective that a failed rank will never join
    (which would leave it waiting, and every later check out of step)."""
    error = None
    try:
        yield
    except AssertionError as exc:
        error = exc
    flag = torch.tensor([float(error is not None)], device=device)
    dist.all_reduce(flag, group=group)
    if error is not None:
        raise error
    if flag.item():
        raise AssertionError("failed on another rank (see its result)")


@dataclass
class Run:
    """One forward + backward: output, gradients by leaf name, running statistics after, and
    the collectives of the forward and of the backward."""

    out: Tensor
    grads: dict[str, Tensor | None]
    stats: list[Tensor | None]
    forward_calls: list[str] = field(default_factory=list)
    backward_calls: list[str] = field(default_factory=list)


def rows_of(sizes: list[int], rank: int) -> slice:
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def run(fn: Callable[[dict, list], Tensor], leaves: dict[str, Tensor | None],
        stats: list[Tensor | None], grad: Tensor) -> Run:
    """fn(leaves, stats) forward, then backward with `grad`, on fresh copies of everything."""
    leaves = {k: v.detach().clone().requires_grad_(True) if v is not None else None
              for k, v in leaves.items()}
    stats = [s.clone() if s is not None else None for s in stats]
    with CollectiveCounter() as forward:
        out = fn(leaves, stats)
    with CollectiveCounter() as backward:
        out.backward(grad)
    grads = {k: v.grad if v is not None else None for k, v in leaves.items()}
    return Run(out.detach(), grads, stats, forward.calls, backward.calls)


@dataclass
class Problem:
    """A whole batch (every rank's rows), its output gradient, and the per-rank sizes."""

    sizes: list[int]
    leaves: dict[str, Tensor | None]
    stats: list[Tensor | None]
    grad: Tensor

    def slice(self, rank: int) -> tuple[dict[str, Tensor | None], list[Tensor | None], Tensor]:
        rows = rows_of(self.sizes, rank)
        leaves = {k: (v[rows] if k in ELEMENT_KEYS else v) if v is not None else None
                  for k, v in self.leaves.items()}
        return leaves, self.stats, self.grad[rows]

    def to64(self) -> Problem:
        return Problem(self.sizes, {k: to64(v) for k, v in self.leaves.items()},
                       [to64(s) for s in self.stats], self.grad.double())


def problem(sizes: list[int], chw: tuple[int, int, int], dtype: torch.dtype, device: torch.device,
            *, layout: str = "nchw", residual: bool = True, affine: bool = True,
            running_stats: bool = True, dual: bool = False, layout2: str = "nchw",
            seed: int = 0) -> Problem:
    """The whole batch: make_case tensors of shape (sum(sizes), *chw), identical on every rank
    (seeded); `dual` adds a second BatchNorm (input2 offset by 3, its own parameters)."""
    shape = (sum(sizes), *chw)
    x, r, w, b, rm, rv = make_case(shape, dtype, layout, residual and not dual, affine, device=device,
                                   seed=seed)
    if not running_stats:
        rm = rv = None
    g = torch.Generator().manual_seed(seed + 100)
    grad = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    if not dual:
        return Problem(sizes, dict(input=x, residual=r, weight=w, bias=b), [rm, rv], grad)
    x2, _, w2, b2, rm2, rv2 = make_case(shape, dtype, layout2, False, affine, offset=3.0,
                                        device=device, seed=seed + 1)
    leaves = dict(input=x, weight=w, bias=b, input2=x2, weight2=w2, bias2=b2)
    return Problem(sizes, leaves, [rm, rv, rm2, rv2], grad)


def single_fn(op: Callable, training: bool = True, momentum: float = 0.1, eps: float = 1e-5,
              **options) -> Callable[[dict, list], Tensor]:
    """fn(leaves, stats) calling a bn_add_relu-like op (extra keyword `options`)."""
    def fn(L, S):
        return op(L["input"], L["residual"], S[0], S[1], L["weight"], L["bias"], training, momentum,
                  eps, **options)
    return fn


def dual_fn(op: Callable, training: bool = True, momentum: float = 0.1, eps: float = 1e-5,
            **options) -> Callable[[dict, list], Tensor]:
    """fn(leaves, stats) calling a dual_bn_add_relu-like op (extra keyword `options`)."""
    def fn(L, S):
        return op(L["input"], S[0], S[1], L["weight"], L["bias"], L["input2"], S[2], S[3],
                  L["weight2"], L["bias2"], training, momentum, eps, **options)
    return fn


@dataclass
class WholeBatch:
    """The single-process side of a comparison on the whole batch: `evaluate(bits)` gives the
    float64 truth and eager PyTorch in the batch's dtype, both with the ReLU decisions `bits`
    (every rank's outputs > 0: no flakes at the kink), and the derived bounds by result name
    ("output", "grad_input", ..., "running_var2")."""

    shape: torch.Size
    evaluate: Callable[[Tensor], tuple[Run, Run, dict[str, Tensor]]]


def whole_batch(prob: Problem, dual: bool, training: bool = True, momentum: float = 0.1, eps: float = 1e-5,
                **options) -> WholeBatch:
    """The whole batch of `prob` through relu(batch_norm(input) + residual), or with `dual` the
    two-BatchNorm tail (`options`: its training2 / momentum2 / eps2)."""
    x = prob.leaves["input"]

    def evaluate(bits: Tensor) -> tuple[Run, Run, dict[str, Tensor]]:
        dy = torch.where(bits, prob.grad.double(), torch.zeros((), dtype=torch.float64, device=bits.device))
        p64 = prob.to64()
        if dual:
            op = dual_reference_with_relu_bits(bits)
            fn, fn64 = (dual_fn(op, training, momentum, eps, **options) for _ in range(2))
            first = tuple(prob.leaves[k] for k in ("input", "weight", "bias")) + tuple(prob.stats[:2])
            second = tuple(prob.leaves[k] for k in ("input2", "weight2", "bias2")) + tuple(prob.stats[2:])
            bounds = dual_bounds(*dual_norms(first, second, training, momentum, eps, **options), x.dtype, dy,
                                 split_sums=True)
        else:
            fn = fn64 = single_fn(reference_with_relu_bits(bits), training, momentum, eps)
            L = prob.leaves
            bounds = bn_add_relu_bounds(x, L["residual"], L["weight"], L["bias"], *prob.stats, training,
                                        momentum, eps, dy, split_sums=True)
        return run(fn64, p64.leaves, p64.stats, p64.grad), run(fn, prob.leaves, prob.stats, prob.grad), bounds

    return WholeBatch(x.shape, evaluate)


def gathered_bits(out: Tensor, shape: torch.Size, rows: slice, group: dist.ProcessGroup | None) -> Tensor:
    """Every rank's output > 0 on the whole batch (a collective)."""
    full = torch.zeros(shape, dtype=torch.float32, device=out.device)
    full[rows] = (out > 0).float()
    dist.all_reduce(full, group=group)
    return full > 0


def compare_with_whole_batch(name: str, got: Run, whole: WholeBatch, sizes: list[int],
                             rank: int, group: dist.ProcessGroup | None = None) -> None:
    """Assert this rank's synchronized results equal the whole-batch ones within the derived
    bound.

    Collectives first (every rank of `group` the same ones, whatever fails later): every
    rank's ReLU decisions, the parameter gradients summed over ranks, and every rank's running
    statistics (which must be bitwise equal on all ranks). Then against the float64 truth on
    the whole batch with those decisions, under its derived bound (eager PyTorch reported, and
    held to it in float32/float64): the output and element gradients (this rank's rows), the
    summed parameter gradients, the running statistics.
    """
    rows = rows_of(sizes, rank)
    bits = gathered_bits(got.out, whole.shape, rows, group)
    truth, eager, bounds = whole.evaluate(bits)  # the same on every rank
    summed = {}
    for key, value in got.grads.items():
        if key in PARAM_KEYS and truth.grads[key] is not None:
            # Summed in float64: the test's own sum must not add a rounding of its own.
            total = (value if value is not None else torch.zeros_like(truth.grads[key])).double()
            dist.all_reduce(total, group=group)
            summed[key] = total
    gathered_stats = []
    for stat in got.stats:
        if stat is not None:
            everywhere = [torch.empty_like(stat) for _ in range(dist.get_world_size(group))]
            dist.all_gather(everywhere, stat, group=group)
            gathered_stats.append(everywhere)
    with agreed(got.out.device, group):
        _assert_equal_to_whole_batch(name, got, truth, eager, bounds, summed, gathered_stats, rows)


def _assert_equal_to_whole_batch(name: str, got: Run, truth: Run, eager: Run, bounds: dict[str, Tensor],
                                 summed: dict[str, Tensor], gathered_stats: list[list[Tensor]],
                                 rows: slice) -> None:
    for everywhere in gathered_stats:
        assert all(torch.equal(everywhere[0], s) for s in everywhere), \
            f"{name}: running statistics differ between ranks: {everywhere}"
    dtype = eager.out.dtype
    assert got.out.dtype == dtype, f"{name}: output dtype {got.out.dtype}"

    def of_rows(bound):
        return bound[rows] if bound.dim() == 4 else bound

    checks = [("output", got.out, truth.out[rows], eager.out[rows], of_rows(bounds["output"]))]
    for key, value in got.grads.items():
        want = truth.grads[key]
        if want is None:
            assert value is None or (key in PARAM_KEYS and not value.any()), f"{name}: {key} grad"
        elif key in ELEMENT_KEYS:
            checks.append((f"grad_{key}", value, want[rows], eager.grads[key][rows],
                           of_rows(bounds[f"grad_{key}"])))
        else:
            checks.append((f"grad_{key} (sum over ranks)", summed.get(key), want, eager.grads[key],
                           bounds[f"grad_{key}"]))
    stat_names = ("running_mean", "running_var", "running_mean2", "running_var2")
    for i, stat in enumerate(got.stats):
        if stat is not None:  # unchanged (bound 0) where not updated
            checks.append((stat_names[i], stat, truth.stats[i], eager.stats[i],
                           bounds.get(stat_names[i], 0.0)))
    for what, value, want, eager_value, bound in checks:
        assert value is not None, f"{name}: {what} is None"
        assert_within_bound(f"{name}: {what} vs the whole batch", value, want, bound, eager_value,
                            eager_computes_as_bounded(dtype))
