"""pytest-benchmark hooks: the copy-bandwidth fixture, a progress line per finished case, the
table's columns, the session's total time and the end-of-session summary."""

from __future__ import annotations

import time

import pytest
from bench_common import (
    COPY,
    DEVICE,
    PROGRESS,
    RESULTS,
    SESSION,
    SESSION_BUDGET_S,
    device_name,
    fill_speedups,
    keep_freed_memory,
    measure_copy_bandwidth,
    summary_lines,
)

# pytest-benchmark's default table has ten statistics columns (about 230 characters a line);
# these three and short test ids keep it near 110. The summary table after it adds min-max,
# GB/s and the speedups.
COLUMNS = ["median", "iqr", "rounds"]
DEFAULT_COLUMNS = ["min", "max", "mean", "stddev", "median", "iqr", "outliers", "ops", "rounds", "iterations"]
_STATE: dict = {}


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    """Our columns, unless --benchmark-columns chose others (pytest-benchmark has read the
    option into its session by now)."""
    _STATE["config"] = config
    session = getattr(config, "_benchmarksession", None)
    if session is not None and list(session.columns) == DEFAULT_COLUMNS:
        session.columns = COLUMNS


def pytest_sessionstart(session):
    SESSION["start"] = time.perf_counter()
    keep_freed_memory()  # the allocator setting every provider runs under (bench_common)


@pytest.fixture(scope="session")
def copy_gbps(request) -> float:
    if request.config.getoption("benchmark_disable", False):
        return float("nan")  # --benchmark-disable: each case runs once as a test, nothing is timed
    return measure_copy_bandwidth()


def pytest_runtest_logfinish(nodeid, location):
    """Each finished case's median and spread as it finishes, so a run cut short (a GPU
    check with a time limit) still shows what it measured."""
    reporter = _STATE["config"].pluginmanager.get_plugin("terminalreporter") if "config" in _STATE else None
    while PROGRESS and reporter is not None:
        reporter.write_line(PROGRESS.pop(0))


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session):
    SESSION["wall_s"] = time.perf_counter() - SESSION.get("start", time.perf_counter())


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Speedups need every provider's result: fill them in once all have run, into the JSON."""
    fill_speedups()
    for bench in output_json["benchmarks"]:
        recorded = RESULTS.get(bench["group"], {}).get(bench["params"].get("provider"))
        if recorded is not None:
            bench["extra_info"].update(recorded.info)
    output_json["machine_info"].setdefault("fused_residual", {})["session_wall_s"] = round(
        time.perf_counter() - SESSION.get("start", time.perf_counter()), 1)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    wall = SESSION.get("wall_s", time.perf_counter() - SESSION.get("start", time.perf_counter()))
    if RESULTS:
        terminalreporter.write_line("")
        for line in summary_lines():
            terminalreporter.write_line(line)
    if config.getoption("benchmark_disable", False):
        terminalreporter.write_line(f"benchmark session: {wall:.1f} s wall (--benchmark-disable: each case "
                                    "ran once, untimed)")
        return
    verdict = "within" if wall <= SESSION_BUDGET_S else "OVER"
    terminalreporter.write_line(f"benchmark session: {wall:.1f} s wall, {verdict} the "
                                f"{SESSION_BUDGET_S:.0f} s budget for {DEVICE} (benchmarks/bench_common.py)")


def pytest_benchmark_update_machine_info(config, machine_info):
    """Name the device, versions and copy bandwidth in the JSON, for scripts/bench_report.py."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    machine_info["fused_residual"] = {
        "device": DEVICE,
        "device_name": device_name(),
        "torch": torch.__version__,
        "triton": triton_version,
        "copy_GBps": round(COPY["GBps"], 1) if "GBps" in COPY else None,
        "malloc": keep_freed_memory(),
    }
