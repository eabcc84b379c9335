"""The benchmark reporting: spread over rounds, the results table (blank cells where a
baseline is missing, a note above 100% of the copy bandwidth) and scripts/bench_report.py's
pooling of several runs. No timing: synthetic rounds."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from fused_residual.bench_utils import COPY_NOTE, ResultRow, Spread, add_speedups, results_table

REPO = Path(__file__).resolve().parent.parent


def load_report():
    spec = importlib.util.spec_from_file_location("bench_report", REPO / "scripts" / "bench_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_spread_quartiles_and_extremes():
    s = Spread.of([0.004, 0.001, 0.003, 0.002, 0.005])  # seconds
    assert (s.median, s.q1, s.q3, s.min, s.max, s.rounds) == pytest.approx((3, 2, 4, 1, 5, 5))
    assert Spread.of([0.002]).median == pytest.approx(2)
    with pytest.raises(ValueError, match="at least one round"):
        Spread.of([])


def test_table_leaves_missing_baselines_blank_and_notes_over_copy():
    rows = [ResultRow("block", "eager", Spread.of([0.002])),
            ResultRow("block", "extension", Spread.of([0.001])),
            ResultRow("tail", "eager", Spread.of([0.004]), gbps=50.0, pct_of_copy=80.0),
            ResultRow("tail", "compile", Spread.of([0.002]), gbps=100.0, pct_of_copy=160.0)]
    add_speedups(rows)
    assert rows[1].vs_eager == pytest.approx(2.0) and rows[1].vs_compile is None
    lines = results_table(rows)
    block_extension = lines[3].split("|")
    assert block_extension[-3].strip() == "2.00x" and block_extension[-2].strip() == ""
    assert "nan" not in "\n".join(lines)
    assert lines[-1] == COPY_NOTE
    assert COPY_NOTE not in results_table(rows[:3])


def _run_json(path: Path, eager_s: list[float], ext_s: list[float], when: str) -> Path:
    def bench(provider, data):
        return {"group": "tail eval_fwd", "params": {"provider": provider},
                "extra_info": {"ideal_bytes": 8_000_000}, "stats": {"data": data, "median": sorted(data)[1]}}

    path.write_text(json.dumps({
        "machine_info": {"fused_residual": {"device": "cpu", "device_name": "test CPU", "torch": "2.x",
                                            "copy_GBps": 10.0}},
        "datetime": when, "benchmarks": [bench("eager", eager_s), bench("extension", ext_s)]}))
    return path


def test_report_pools_runs(tmp_path):
    report = load_report()
    runs = [report.load(_run_json(tmp_path / "a.json", [0.004, 0.004, 0.004], [0.001, 0.001, 0.001], "d1")),
            report.load(_run_json(tmp_path / "b.json", [0.008, 0.008, 0.008], [0.002, 0.002, 0.002], "d2"))]
    rows = {r.provider: r for r in report.pooled_rows(runs)}
    ext = rows["extension"]
    assert ext.spread.rounds == 6 and ext.spread.median == pytest.approx(1.5)
    assert ext.run_medians == pytest.approx((1.0, 2.0))
    assert ext.gbps == pytest.approx(8_000_000 / 1.5 / 1e6)
    assert ext.pct_of_copy == pytest.approx(100 * ext.gbps / 10.0)
    assert ext.vs_eager == pytest.approx(6.0 / 1.5)
    text = report.section(runs, None)
    assert "2 run(s), pooled" in text and "run medians ms" in text


def _case_json(path: Path, case: str, results: dict[str, tuple[list[float], dict]]) -> Path:
    path.write_text(json.dumps({
        "machine_info": {"fused_residual": {"device": "cpu", "device_name": "test CPU"}}, "datetime": "d",
        "benchmarks": [{"group": case, "params": {"provider": p}, "extra_info": info,
                        "stats": {"data": data, "median": sorted(data)[len(data) // 2]}}
                       for p, (data, info) in results.items()]}))
    return path


def test_report_issue21_checks(tmp_path):
    """The block sweep's never-slower line, the per-call overhead line against 1.1x, and the
    whole-step bound: bound = E (1 - replaced share) + C * fused share."""
    report = load_report()
    step = "resnet50 train step"
    runs = [report.load(_case_json(tmp_path / "a.json", step, {
        "eager": ([1.0, 1.0, 1.0], {"replaced_share": 0.2}),
        "eager+convert": ([0.9, 0.9, 0.9], {"fused_share": 0.05})}))]
    rows = report.pooled_rows(runs)
    (line,) = report.step_bound_lines(runs, rows)
    # E = 1000 ms, C = 900 ms: bound = 1000 * 0.8 + 900 * 0.05 = 845 ms, gain 155 ms, reached 100/155.
    assert "would take 845.0 ms" in line and "65% of the achievable gain (155.0 ms)" in line

    block = report.load(_case_json(tmp_path / "b.json", "block 1x64 eval_fwd", {
        "eager": ([0.010, 0.010, 0.011], {}), "extension": ([0.012, 0.012, 0.013], {})}))
    over = report.load(_case_json(tmp_path / "c.json", "overhead bn_add_relu train_fwdbwd", {
        "eager": ([100e-6] * 3, {}), "extension": ([105e-6] * 3, {})}))
    rows = report.pooled_rows([block, over])
    (sweep,) = report.never_slower_lines(rows, "block", "eager", "block sweep")
    assert "beyond the run-to-run spread: block 1x64 eval_fwd" in sweep
    (overhead,) = report.overhead_lines(rows)
    assert "1.05x (within the 1.1x limit)" in overhead


def test_report_lists_a_case_without_providers_under_its_function(tmp_path):
    """benchmarks/test_convert_bench.py times convert() itself: no provider parameter."""
    report = load_report()
    path = tmp_path / "c.json"
    path.write_text(json.dumps({
        "machine_info": {"fused_residual": {"device": "cpu"}}, "datetime": "d",
        "benchmarks": [{"group": "convert() of resnet152", "params": {"arch": "resnet152"},
                        "extra_info": {}, "stats": {"data": [0.2, 0.1, 0.3], "median": 0.2}}]}))
    _, cases = report.load(path)
    assert list(cases["convert() of resnet152"]) == ["convert"]
    rows = report.pooled_rows([report.load(path)])
    assert [(r.provider, r.spread.median) for r in rows] == [("convert", pytest.approx(200.0))]
