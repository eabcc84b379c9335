"""Shared benchmark pieces: device, copy bandwidth, result registry and the summary.

Every fused-tail result gets `extra_info` with ms, effective GB/s (from
fused_residual.bench_utils.ideal_bytes), percent of the copy bandwidth measured in the same
session, and speedups over eager and torch.compile for the same case (filled in at the end
of the session, once every provider has run). A Markdown summary table prints last.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections import defaultdict

import torch

from fused_residual.bench_utils import synchronize

DEVICE = os.environ.get("FUSED_RESIDUAL_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")

# case -> provider -> (median ms, extra_info dict); filled by the benchmarks.
RESULTS: dict[str, dict[str, tuple[float, dict]]] = defaultdict(dict)
COPY: dict[str, float] = {}


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


def record(case: str, provider: str, benchmark, extra: dict) -> None:
    """Store a finished benchmark's median (ms) and its extra_info for the summary."""
    stats = getattr(benchmark, "stats", None)
    if stats is None or getattr(stats, "stats", None) is None:
        return  # benchmarking disabled
    ms = stats.stats.median * 1e3
    extra["ms"] = round(ms, 4)
    benchmark.extra_info.update(extra)
    RESULTS[case][provider] = (ms, benchmark.extra_info)


def fill_speedups() -> None:
    for providers in RESULTS.values():
        for baseline in ("eager", "compile"):
            if baseline not in providers:
                continue
            base_ms = providers[baseline][0]
            for ms, info in providers.values():
                info[f"speedup_vs_{baseline}"] = round(base_ms / ms, 3)


def summary_lines() -> list[str]:
    """The Markdown summary table of every recorded result."""
    fill_speedups()
    lines = [
        f"fused_residual benchmark summary: {device_name()}, torch {torch.__version__}, "
        f"copy bandwidth {COPY.get('GBps', float('nan')):.1f} GB/s",
        "| case | provider | ms | GB/s | % of copy | vs eager | vs compile |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for case, providers in RESULTS.items():
        for provider, (ms, info) in providers.items():
            gbps, pct = info.get("GBps"), info.get("pct_of_copy")
            cells = [case, provider, f"{ms:.3f}", "" if gbps is None else f"{gbps:.1f}",
                     "" if pct is None else f"{pct:.0f}%",
                     f"{info.get('speedup_vs_eager', float('nan')):.2f}x",
                     f"{info.get('speedup_vs_compile', float('nan')):.2f}x"]
            lines.append("| " + " | ".join(cells) + " |")
    return lines
