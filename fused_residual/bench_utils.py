"""Shared measurement pieces: the ideal-bytes model, the problem builder, a timer that keeps
the spread of its repetitions, and the one way dtypes are printed.

Used by `python -m fused_residual` and by benchmarks/, so that every GB/s figure in this
project comes from one definition.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

MODES = ("eval_fwd", "train_fwd", "train_fwdbwd")


def ideal_bytes(mode: str, numel: int, itemsize: int, residual: bool = True) -> int:
    """Bytes an ideal fused tail must move, counting whole-tensor passes.

    - eval_fwd and train_fwd: read input, read residual, write output (3 passes; 2 without a
      residual). The statistics pass of training is not counted: an ideal kernel keeps the
      tensor on chip between statistics and apply.
    - train_fwdbwd: the forward's passes, plus the backward's read of grad_out and input,
      write of grad_input and grad_residual (7 passes; 5 without a residual), plus the 1-bit
      ReLU mask written by the forward and read by the backward (numel / 8 bytes each way).
    Per-channel vectors (C values) are negligible and not counted.
    """
    fwd_passes = 3 if residual else 2
    if mode in ("eval_fwd", "train_fwd"):
        return fwd_passes * numel * itemsize
    if mode == "train_fwdbwd":
        bwd_passes = 4 if residual else 3
        return (fwd_passes + bwd_passes) * numel * itemsize + 2 * ((numel + 7) // 8)
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@dataclass(frozen=True)
class Timing:
    """Wall times of repeated runs of one case, in ms: the median and the spread."""

    times_ms: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def min(self) -> float:
        return min(self.times_ms)

    @property
    def max(self) -> float:
        return max(self.times_ms)

    def format(self, digits: int = 3) -> str:
        """`median [min-max]`, e.g. `4.580 [4.310-6.020]`."""
        return f"{self.median:.{digits}f} [{self.min:.{digits}f}-{self.max:.{digits}f}]"


def time_ms(fn: Callable[[], object], device: torch.device | str, warmup: int = 3,
            reps: int = 10) -> Timing:
    """Wall time of each of `reps` calls of `fn` after `warmup` untimed ones, synchronising
    the device around each call."""
    if reps < 1:
        raise ValueError(f"reps must be at least 1, got {reps}")
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return Timing(tuple(times))


def dtype_name(dtype: torch.dtype) -> str:
    """`float32` for torch.float32: the one way this project prints a dtype."""
    return str(dtype).removeprefix("torch.")


@dataclass
class TailProblem:
    """Tensors of one tail case: y = conv output, r = residual, BN parameters and stats."""

    input: Tensor
    residual: Tensor | None
    weight: Tensor
    bias: Tensor
    running_mean: Tensor
    running_var: Tensor
    grad: Tensor

    @property
    def numel(self) -> int:
        return self.input.numel()

    @property
    def itemsize(self) -> int:
        return self.input.element_size()


def make_tail_problem(shape: tuple[int, int, int, int], dtype: torch.dtype,
                      channels_last: bool, device: torch.device | str,
                      residual: bool = True) -> TailProblem:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    c = shape[1]

    def element() -> Tensor:
        return torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)

    weight = torch.rand(c, device=device) + 0.5
    bias = torch.randn(c, device=device) * 0.1
    return TailProblem(element(), element() if residual else None, weight, bias,
                       torch.zeros(c, device=device), torch.ones(c, device=device), element())


def tail_callable(problem: TailProblem, mode: str, forward: Callable[..., Tensor]) -> Callable[[], object]:
    """A no-argument callable running `mode` of `forward(input, residual, rm, rv, w, b, training)`."""
    p = problem
    if mode == "eval_fwd":
        def run():
            with torch.no_grad():
                return forward(p.input, p.residual, p.running_mean, p.running_var, p.weight, p.bias, False)
        return run
    if mode == "train_fwd":
        def run():
            with torch.no_grad():
                return forward(p.input, p.residual, p.running_mean, p.running_var, p.weight, p.bias, True)
        return run
    if mode != "train_fwdbwd":
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    leaves = [t.detach().requires_grad_(True) for t in (p.input, p.residual, p.weight, p.bias)
              if t is not None]

    def run():
        x = leaves[0]
        r = leaves[1] if p.residual is not None else None
        w, b = leaves[-2], leaves[-1]
        out = forward(x, r, p.running_mean, p.running_var, w, b, True)
        return torch.autograd.grad(out, leaves, p.grad)

    return run


# --------------------------------------------------------------------------------------
# Reporting: the spread of a case's rounds and the one Markdown results table, shared by
# the benchmarks' end-of-session summary (benchmarks/bench_common.py) and RESULTS.md
# (scripts/bench_report.py).
# --------------------------------------------------------------------------------------

COPY_NOTE = ("Above 100% of the copy bandwidth: a case's tensors (tens of MB) partly stay in the caches "
             "between its passes, while the copy measurement streams 256 MiB (1 GiB on a GPU) past them.")


@dataclass(frozen=True)
class Spread:
    """Per-round wall times of one case, in ms: median, quartiles, extremes and count."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    rounds: int

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Spread:
        ms = sorted(s * 1e3 for s in seconds)
        if not ms:
            raise ValueError("Spread.of needs at least one round")
        if len(ms) == 1:
            return cls(ms[0], ms[0], ms[0], ms[0], ms[0], 1)
        q1, median, q3 = statistics.quantiles(ms, n=4, method="inclusive")
        return cls(median, q1, q3, ms[0], ms[-1], len(ms))


@dataclass
class ResultRow:
    """One provider on one case. GB/s and % of copy exist for the tail cases only; the
    speedups are ratios of medians (`add_speedups`); `run_medians` is (lowest, highest)
    median of the separate runs pooled into `spread`, when there were several."""

    case: str
    provider: str
    spread: Spread
    gbps: float | None = None
    pct_of_copy: float | None = None
    vs_eager: float | None = None
    vs_compile: float | None = None
    run_medians: tuple[float, float] | None = None


def add_speedups(rows: Sequence[ResultRow]) -> None:
    """vs_eager / vs_compile of every row whose case has an eager / compile row."""
    medians: dict[tuple[str, str], float] = {(r.case, r.provider): r.spread.median for r in rows}
    for row in rows:
        eager, compiled = medians.get((row.case, "eager")), medians.get((row.case, "compile"))
        row.vs_eager = None if eager is None else eager / row.spread.median
        row.vs_compile = None if compiled is None else compiled / row.spread.median


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "" if value is None else format(value, spec) + suffix


def results_table(rows: Sequence[ResultRow]) -> list[str]:
    """Markdown table lines; a note follows when a case exceeds the copy bandwidth."""
    several_runs = any(r.run_medians is not None for r in rows)
    head = ["case", "provider", "median ms", "IQR ms", "min-max ms", "rounds"]
    head += ["run medians ms"] if several_runs else []
    head += ["GB/s", "% of copy", "vs eager", "vs compile"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for r in rows:
        s = r.spread
        cells = [r.case, r.provider, f"{s.median:.3f}", f"{s.q1:.3f}-{s.q3:.3f}", f"{s.min:.3f}-{s.max:.3f}",
                 str(s.rounds)]
        if several_runs:
            cells.append("" if r.run_medians is None else f"{r.run_medians[0]:.3f}-{r.run_medians[1]:.3f}")
        cells += [_fmt(r.gbps, ".1f"), _fmt(r.pct_of_copy, ".0f", "%"), _fmt(r.vs_eager, ".2f", "x"),
                  _fmt(r.vs_compile, ".2f", "x")]
        lines.append("| " + " | ".join(cells) + " |")
    if any(r.pct_of_copy is not None and r.pct_of_copy > 100 for r in rows):
        lines += ["", COPY_NOTE]
    return lines
