"""pytest-benchmark hooks: the copy-bandwidth fixture and the end-of-session summary."""

from __future__ import annotations

import pytest
from bench_common import RESULTS, fill_speedups, measure_copy_bandwidth, summary_lines


@pytest.fixture(scope="session")
def copy_gbps(request) -> float:
    if request.config.getoption("benchmark_disable", False):
        return float("nan")  # --benchmark-disable: each case runs once as a test, nothing is timed
    return measure_copy_bandwidth()


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    # Runs before pytest-benchmark writes its JSON, so the speedups land in it.
    fill_speedups()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not RESULTS:
        return
    terminalreporter.write_line("")
    for line in summary_lines():
        terminalreporter.write_line(line)
