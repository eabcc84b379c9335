"""pytest plugin of the first GPU run's benchmark step (`-p bench_cases`, scripts/ on the path):
each benchmark case's figures appended to $GPU_CHECK_BENCH_CASES as one JSON line the moment
the case ends, so a run killed mid-session keeps every finished case even if pytest-benchmark
never writes its JSON (it does so at session end)."""

from __future__ import annotations

import json
import os

import pytest

STATS = ("min", "max", "mean", "median", "iqr", "stddev", "rounds")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item, nextitem):
    path = os.environ.get("GPU_CHECK_BENCH_CASES")
    fixture = getattr(item, "funcargs", {}).get("benchmark")
    stats = getattr(getattr(fixture, "stats", None), "stats", None)
    if not path or stats is None:
        return
    line = {
        "name": item.nodeid,
        **{key: getattr(stats, key, None) for key in STATS},
        "extra_info": getattr(fixture, "extra_info", {}),
    }
    with open(path, "a") as f:
        f.write(json.dumps(line, default=str) + "\n")
