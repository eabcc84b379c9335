"""Shared benchmark pieces: device, time budget, honest torch.compile baselines, copy
bandwidth, result registry and the end-of-session summary.

Every case runs through `time_case`: `WARMUP` untimed calls (the first one compiles a
torch.compile baseline and JIT-compiles Triton kernels), then pytest-benchmark's timed
rounds, one call each, the device synchronised inside the call. Results are recorded with
their spread (median, quartiles, min-max over the rounds) and, for the fused tail, effective
GB/s from `fused_residual.bench_utils.ideal_bytes`, percent of the copy bandwidth measured in
the same session, and speedups over eager and torch.compile for the same case (ratios of
medians, filled in once every provider has run). A Markdown summary table prints last.

Time budget. On a GPU the benchmarks are the last step of scripts/gpu_check.sh
(scripts/gpu_plan.py), which gets whatever its one deadline leaves, and each case is written as
it finishes (bench_cases.jsonl); SESSION_BUDGET_S = 240 s is what a whole session is sized
for, printed against its wall time at the end. Each case's rounds come from a per-case
budget of timed time: rounds = CASE_BUDGET_S / (seconds per round, from the warm-up), kept
within [MIN_ROUNDS, MAX_ROUNDS]. The GPU session has 80 tail cases, 12 block cases and 4
ResNet-50 steps. Timed: tail and block rounds take well under a millisecond to a few ms, so
each case stops at CASE_BUDGET_S (92 x 0.15 s = 14 s); a bf16 ResNet-50 step at batch 128
takes tens of ms, so it gets MIN_ROUNDS (4 x 20 x ~0.1 s = 8 s). Untimed, estimated for an
H200 (not measured there yet): torch.compile of the 20 tail graphs (~2.5 s each, 50 s) and of
2 ResNet-50 training steps (~55 s each, 110 s); the Triton JIT of the fused kernels at the
benchmark shapes (at most 8 kernel versions per shape and dtype/layout, 80 x ~0.17 s = 14 s);
imports and CUDA initialisation (~15 s): 14 + 8 + 50 + 110 + 14 + 15 = 211 s. Once the
session's wall time passes SESSION_BUDGET_S, the remaining cases drop to MIN_ROUNDS. The
session prints each case as it finishes with its first call's time (compile and JIT
included) and its total wall time, so the first GPU run replaces these estimates with
measurements. On a CPU the budget is looser (no stage to fit; CI runs the benchmarks with
--benchmark-disable, once each).

Compile baselines (`compile_baseline`, `time_case(..., compiled=True)`): a fresh compiled
function per case after `torch._dynamo.reset()`, the same options for every compiled
provider (COMPILE_OPTIONS), warmed up before timing. A torch.compile'd function that hits
its recompile limit otherwise falls back to eager code silently (what made most "compile"
rows of the first CPU results eager timings); here, hitting the limit raises, errors are
never suppressed into eager, a warm-up that compiled no graph raises, and any recompile
during the timed rounds raises.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch._dynamo
from torch._dynamo.utils import counters

from fused_residual.bench_utils import ResultRow, Spread, add_speedups, results_table, synchronize

DEVICE = os.environ.get("FUSED_RESIDUAL_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")

if DEVICE == "cuda":
    SESSION_BUDGET_S, CASE_BUDGET_S, MIN_ROUNDS, MAX_ROUNDS, WARMUP = 240.0, 0.15, 20, 300, 3
else:
    # CPU rounds take milliseconds to a ResNet-50 step's ~0.4 s on 2 cores, and the machine is
    # noisy (fresh 25 MB buffers page-fault, glibc's mmap threshold moves): more timed time.
    SESSION_BUDGET_S, CASE_BUDGET_S, MIN_ROUNDS, MAX_ROUNDS, WARMUP = 1800.0, 1.0, 15, 100, 3

# glibc's malloc, as configured by default, hands buffers above its mmap threshold back to the
# kernel when they are freed (munmap, or trimming the heap top), so that the next buffer of
# the same size is mapped afresh and page-faults on first touch: about 4 KiB per fault, 0.5-2
# µs each. Which provider pays depends on its sequence of allocations and frees, not on its
# kernels: measured for FusedResidualBlock's eval forward, 8x64x28x28 float32 channels_last
# (2-core machine, 100 calls after 10 warm-up calls, each path in its own process), eager
# 1144 minor faults per call and fused 1505 (fewer buffers live at once let the heap top be
# trimmed more often), about 1 ms of a ~8 ms call: the fused block's eval forward ran slower
# than eager's (issue 21). With the thresholds below (what MALLOC_MMAP_THRESHOLD_=33554432
# MALLOC_TRIM_THRESHOLD_=1073741824 in the environment would set) freed memory is kept and
# reused: 4 and 0 faults per call. Every provider runs under the same setting; buffers above
# 32 MiB (glibc's largest threshold) are still mapped per allocation, for every provider.
# PyTorch's CPU performance guidance (jemalloc or tcmalloc instead of glibc's malloc) is for the
# same effect. FUSED_RESIDUAL_BENCH_MALLOC=default keeps glibc's defaults.
MALLOC_SETTING = "glibc malloc defaults"


def keep_freed_memory() -> str:
    """Set glibc's mmap threshold to 32 MiB and its trim threshold to 1 GiB (see above);
    returns what the session runs with, for the results' machine info."""
    global MALLOC_SETTING
    if os.environ.get("FUSED_RESIDUAL_BENCH_MALLOC") == "default" or not platform.libc_ver()[0] == "glibc":
        return MALLOC_SETTING
    import ctypes

    libc = ctypes.CDLL(None)
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    if libc.mallopt(m_mmap_threshold, 32 << 20) == 1 and libc.mallopt(m_trim_threshold, 1 << 30) == 1:
        MALLOC_SETTING = "glibc malloc, mmap threshold 32 MiB, trim threshold 1 GiB"
    return MALLOC_SETTING


# One set of options for every torch.compile provider: no graph break may hide eager code
# (fullgraph), and shapes are specialised per case as a user's static-shape model is.
COMPILE_OPTIONS = {"fullgraph": True, "dynamic": False}


@dataclass
class Recorded:
    """One provider's result on one case: per-round seconds and its extra_info."""

    seconds: list[float]
    info: dict = field(default_factory=dict)

    @property
    def spread(self) -> Spread:
        return Spread.of(self.seconds)


# case -> provider -> Recorded; filled by the benchmarks.
RESULTS: dict[str, dict[str, Recorded]] = defaultdict(dict)
COPY: dict[str, float] = {}
SESSION: dict[str, float] = {}
PROGRESS: list[str] = []  # one line per finished case, printed by conftest as it finishes


def device_name() -> str:
    if DEVICE == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.machine()} CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def measure_copy_bandwidth() -> float:
    """GB/s of a large device-to-device copy (read + write bytes), the session's ceiling."""
    if "GBps" in COPY:
        return COPY["GBps"]
    nbytes = 1 << (30 if DEVICE == "cuda" else 28)  # 1 GiB on GPU, 256 MiB on CPU: far past cache
    src = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE).fill_(1)
    dst = torch.empty_like(src)
    times = []
    for i in range(25 if DEVICE == "cuda" else 8):
        synchronize(DEVICE)
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(DEVICE)
        if i >= 3:
            times.append(time.perf_counter() - start)
    COPY["GBps"] = 2 * nbytes / statistics.median(times) / 1e9
    return COPY["GBps"]


# --------------------------------------------------------------------------------------
# torch.compile baselines and timing
# --------------------------------------------------------------------------------------


def compile_baseline(fn: Callable) -> Callable:
    """`fn` compiled afresh for one case: dynamo's caches are cleared first, so no earlier
    case's graphs or recompiles count against this one."""
    torch._dynamo.reset()
    return torch.compile(fn, **COMPILE_OPTIONS)


def graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process (its counters survive `reset()`)."""
    return counters["stats"]["unique_graphs"]


@contextlib.contextmanager
def strict_compile(timing: bool) -> Iterator[None]:
    """Make a silent fallback to eager code an error: hitting the recompile limit raises,
    compile errors are not suppressed, and (`timing`) any recompile at all raises."""
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True, suppress_errors=False,
                                    error_on_recompile=timing):
        yield


def rounds_for(seconds_per_round: float) -> int:
    """Timed rounds of one case: CASE_BUDGET_S worth, within [MIN_ROUNDS, MAX_ROUNDS];
    MIN_ROUNDS once the session is past its budget."""
    if SESSION and time.perf_counter() - SESSION["start"] > SESSION_BUDGET_S:
        return MIN_ROUNDS
    return max(MIN_ROUNDS, min(MAX_ROUNDS, int(CASE_BUDGET_S / max(seconds_per_round, 1e-9))))


def time_case(benchmark, fn: Callable[[], object], compiled: bool = False,
              before_timing: Callable[[], object] | None = None, iterations: int = 1) -> dict:
    """Warm `fn` up, then time it with `benchmark` for `rounds_for` rounds (`iterations` calls
    each, reported per call; `fn` synchronises the device itself). A compiled baseline must
    compile in its warm-up and may not recompile while timed. `before_timing` runs between
    the two (e.g. resetting a peak memory counter). Returns extra_info with the first call's
    seconds (compile and JIT included)."""
    disabled = getattr(benchmark, "disabled", False)
    warm_times = []
    with strict_compile(timing=False) if compiled else contextlib.nullcontext():
        before = graphs_compiled()
        for _ in range(1 if disabled else WARMUP):
            start = time.perf_counter()
            fn()
            warm_times.append(time.perf_counter() - start)
        if compiled and graphs_compiled() == before:
            raise RuntimeError("torch.compile baseline compiled no graph in its warm-up: its timings "
                               "would be eager code")
    per_round = statistics.median(warm_times[1:]) if len(warm_times) > 1 else warm_times[0]
    rounds = rounds_for(per_round * iterations)
    if before_timing is not None:
        before_timing()
    with strict_compile(timing=True) if compiled else contextlib.nullcontext():
        benchmark.pedantic(fn, rounds=rounds, warmup_rounds=0, iterations=iterations)
    return {"first_call_s": round(warm_times[0], 3)}


def record(case: str, provider: str, benchmark, extra: dict) -> None:
    """Store a finished benchmark's rounds and extra_info for the summary."""
    stats = getattr(benchmark, "stats", None)
    if stats is None or getattr(stats, "stats", None) is None:
        return  # benchmarking disabled
    result = Recorded(list(stats.stats.data), benchmark.extra_info)
    s = result.spread
    extra.update(ms=round(s.median, 4), q1_ms=round(s.q1, 4), q3_ms=round(s.q3, 4))
    benchmark.extra_info.update(extra)
    RESULTS[case][provider] = result
    first = f", first call {extra['first_call_s']:.1f} s" if "first_call_s" in extra else ""
    PROGRESS.append(f"[bench {time.perf_counter() - SESSION.get('start', 0.0):6.1f} s] {case} | {provider}: "
                    f"median {s.median:.3f} ms (IQR {s.q1:.3f}-{s.q3:.3f}, {s.rounds} rounds){first}")


def rows() -> list[ResultRow]:
    """Every recorded result as a results-table row, speedups filled in."""
    table = []
    for case, providers in RESULTS.items():
        for provider, result in providers.items():
            table.append(ResultRow(case, provider, result.spread, gbps=result.info.get("GBps"),
                                   pct_of_copy=result.info.get("pct_of_copy")))
    add_speedups(table)
    return table


def fill_speedups() -> None:
    """Write each result's speedups (ratios of medians) into its extra_info, for the JSON."""
    for row in rows():
        info = RESULTS[row.case][row.provider].info
        for key, value in (("speedup_vs_eager", row.vs_eager), ("speedup_vs_compile", row.vs_compile)):
            if value is not None:
                info[key] = round(value, 3)


def summary_lines() -> list[str]:
    """The Markdown summary table of every recorded result."""
    return [f"fused_residual benchmark summary: {device_name()}, torch {torch.__version__}, "
            f"copy bandwidth {COPY.get('GBps', float('nan')):.1f} GB/s; spread over each case's rounds",
            *results_table(rows())]
