"""pytest-benchmark hooks: the copy-bandwidth fixture and the end-of-session summary."""

from __future__ import annotations

import pytest
from bench_common import (
    COPY,
    DEVICE,
    RESULTS,
    device_name,
    fill_speedups,
    measure_copy_bandwidth,
    summary_lines,
)


@pytest.fixture(scope="session")
def copy_gbps(request) -> float:
    if request.config.getoption("benchmark_disable", False):
        return float("nan")  # --benchmark-disable: each case runs once as a test, nothing is timed
    return measure_copy_bandwidth()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Speedups need every provider's result: fill them in once all have run, into the JSON."""
    fill_speedups()
    for bench in output_json["benchmarks"]:
        recorded = RESULTS.get(bench["group"], {}).get(bench["params"].get("provider"))
        if recorded is not None:
            bench["extra_info"].update(recorded[1])


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not RESULTS:
        return
    terminalreporter.write_line("")
    for line in summary_lines():
        terminalreporter.write_line(line)


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
    }
