"""Turn pytest-benchmark JSON files (from benchmarks/) into Markdown tables, plots and RESULTS.md.

Regenerate the repository's CPU results (three runs, pooled; about 35 minutes on a quiet 2-core
machine: each session is about 11, see benchmarks/test_block_bench.py):

    for run in 1 2 3; do
        pytest benchmarks/ --benchmark-only --benchmark-json=results/cpu-run$run.json
    done
    python scripts/bench_report.py results/cpu-run*.json [results/gpu-run*.json] \\
        --results RESULTS.md --plot-dir results

JSON files of the same device are runs of one section: each case's figures pool the rounds
of every run (median, interquartile range and min-max over all rounds) and, with several
runs, give the lowest and highest per-run median, the run-to-run spread that a single run
hides. Per case (shape x dtype x layout x mode) and provider: those times, effective GB/s
(ideal bytes from the JSON's extra_info / median time), % of the copy bandwidth measured in
the same runs, and speedups over eager and torch.compile (ratios of pooled medians). A
headline gives the geometric-mean speedups of each fused backend for training
forward+backward; a PNG per device shows GB/s per case with the IQR as error bars and the
copy bandwidth as a line. Every number comes from the JSON; none is typed in. With
`--results`, RESULTS.md is written whole; a device without a JSON is "not measured yet".
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's fused_residual
from fused_residual.bench_utils import ResultRow, Spread, add_speedups, results_table

PROVIDER_ORDER = ["eager", "compile", "extension", "triton"]
REGENERATE = ("for run in 1 2 3; do pytest benchmarks/ --benchmark-only "
              "--benchmark-json=results/cpu-run$run.json; done; python scripts/bench_report.py "
              "results/cpu-run*.json --results RESULTS.md --plot-dir results")


def load(path: Path) -> tuple[dict, dict[str, dict[str, dict]]]:
    """(run metadata, case -> provider -> {"info": extra_info, "seconds": per-round times})."""
    data = json.loads(path.read_text())
    meta = dict(data.get("machine_info", {}).get("fused_residual", {}))
    meta["datetime"] = data.get("datetime", "")
    meta["cpu"] = data.get("machine_info", {}).get("cpu", {}).get("brand_raw", "")
    meta["python"] = data.get("machine_info", {}).get("python_version", "")
    meta["path"] = str(path)
    cases: dict[str, dict[str, dict]] = defaultdict(dict)
    for bench in data["benchmarks"]:
        seconds = bench["stats"].get("data") or [bench["stats"]["median"]]
        # A case with one provider (benchmarks/test_convert_bench.py's convert() time) has no
        # provider parameter: it is listed under the function it times.
        provider = (bench.get("params") or {}).get("provider", "convert")
        cases[bench["group"]][provider] = {"info": bench.get("extra_info", {}), "seconds": seconds}
    return meta, cases


def _provider_rank(provider: str) -> int:
    return PROVIDER_ORDER.index(provider) if provider in PROVIDER_ORDER else len(PROVIDER_ORDER)


def pooled_rows(runs: list[tuple[dict, dict]]) -> list[ResultRow]:
    """One row per case and provider over all runs: pooled rounds, GB/s, % of copy, speedups."""
    copies = [meta["copy_GBps"] for meta, _ in runs if meta.get("copy_GBps")]
    copy = statistics.median(copies) if copies else None
    merged: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for _, cases in runs:
        for case, providers in cases.items():
            for provider, result in providers.items():
                merged[case][provider].append(result)
    rows = []
    for case, providers in merged.items():
        for provider in sorted(providers, key=_provider_rank):
            results = providers[provider]
            spread = Spread.of([s for r in results for s in r["seconds"]])
            medians = [Spread.of(r["seconds"]).median for r in results]
            row = ResultRow(case, provider, spread,
                            run_medians=(min(medians), max(medians)) if len(results) > 1 else None)
            nbytes = results[0]["info"].get("ideal_bytes")
            if nbytes:
                row.gbps = nbytes / spread.median / 1e6
                row.pct_of_copy = 100 * row.gbps / copy if copy else None
            rows.append(row)
    add_speedups(rows)
    return rows


def headline(rows: list[ResultRow], mode: str = "train_fwdbwd") -> list[str]:
    """Geometric-mean speedup of each fused provider over eager and compile, over `mode` cases."""
    lines = []
    fused = sorted({r.provider for r in rows} - {"eager", "compile"}, key=_provider_rank)
    for provider in fused:
        for baseline in ("eager", "compile"):
            ratios = [getattr(r, f"vs_{baseline}") for r in rows
                      if r.provider == provider and r.case.endswith(mode)
                      and getattr(r, f"vs_{baseline}") is not None]
            if ratios:
                geo = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
                lines.append(f"- {provider} vs {baseline}, {mode}: geometric mean {geo:.2f}x over "
                             f"{len(ratios)} case(s), min {min(ratios):.2f}x, max {max(ratios):.2f}x "
                             "(ratios of pooled medians)")
    return lines


def _slower_beyond_spread(row: ResultRow, base: ResultRow) -> bool:
    """`row` slower than `base` beyond the noise: with several runs, its fastest run median
    above the base's slowest run median; with one run, its first quartile above the base's
    third."""
    if row.run_medians is not None and base.run_medians is not None:
        return row.run_medians[0] > base.run_medians[1]
    return row.spread.q1 > base.spread.q3


def never_slower_lines(rows: list[ResultRow], prefix: str, baseline: str, label: str) -> list[str]:
    """Per fused provider, over the cases whose name starts with `prefix`: the worst and best
    ratio to `baseline` and the cases slower than it beyond the spread (issue 21: none)."""
    by_key = {(r.case, r.provider): r for r in rows}
    lines = []
    compiled = baseline == "compile"  # compiled fused providers against compile, the rest against eager
    providers = sorted({r.provider for r in rows if r.case.startswith(prefix)
                        and r.provider not in ("eager", "compile")
                        and r.provider.startswith("compile") == compiled}, key=_provider_rank)
    for provider in providers:
        pairs = [(r, by_key[(r.case, baseline)]) for r in rows
                 if r.provider == provider and r.case.startswith(prefix) and (r.case, baseline) in by_key]
        if not pairs:
            continue
        ratios = [(b.spread.median / r.spread.median, r.case) for r, b in pairs]
        slower = [r.case for r, b in pairs if _slower_beyond_spread(r, b)]
        worst, best = min(ratios), max(ratios)
        lines.append(f"- {label}, {provider} vs {baseline}: {len(pairs)} case(s), {worst[0]:.2f}x "
                     f"(worst: {worst[1]}) to {best[0]:.2f}x; slower than {baseline} beyond the "
                     f"run-to-run spread: {', '.join(slower) if slower else 'none'}")
    return lines


OVERHEAD_LIMIT = 1.1  # issue 21: a fused call may cost at most 1.1x eager's host time


def overhead_lines(rows: list[ResultRow]) -> list[str]:
    """Per-call host overhead (benchmarks/test_overhead_bench.py): fused / eager µs per call
    against the 1.1x limit."""
    by_key = {(r.case, r.provider): r for r in rows}
    lines = []
    for r in rows:
        if not r.case.startswith("overhead") or r.provider == "eager" or (r.case, "eager") not in by_key:
            continue
        eager = by_key[(r.case, "eager")].spread.median
        ratio = r.spread.median / eager
        verdict = "within" if ratio <= OVERHEAD_LIMIT else "OVER"
        lines.append(f"- {r.case}: {r.provider} {1e3 * r.spread.median:.1f} µs vs eager {1e3 * eager:.1f} µs "
                     f"per call, {ratio:.2f}x ({verdict} the {OVERHEAD_LIMIT}x limit)")
    return lines


def _mean_info(results: list[dict], key: str) -> float | None:
    values = [r["info"][key] for r in results if key in r["info"]]
    return statistics.mean(values) if values else None


def step_bound_lines(runs: list[tuple[dict, dict]], rows: list[ResultRow]) -> list[str]:
    """The whole-step bound of each model case whose eager and eager+convert results carry the
    profiled shares (benchmarks/test_model_bench.py): bound = E (1 - replaced share) + C *
    fused share, and the part of the achievable gain E - bound that eager+convert reaches."""
    by_key = {(r.case, r.provider): r for r in rows}
    lines = []
    for case in dict.fromkeys(r.case for r in rows):
        eager_row, convert_row = by_key.get((case, "eager")), by_key.get((case, "eager+convert"))
        if eager_row is None or convert_row is None:
            continue
        eager = [c[case]["eager"] for _, c in runs if "eager" in c.get(case, {})]
        convert = [c[case]["eager+convert"] for _, c in runs if "eager+convert" in c.get(case, {})]
        replaced, fused = _mean_info(eager, "replaced_share"), _mean_info(convert, "fused_share")
        if replaced is None or fused is None:
            continue
        e, c = eager_row.spread.median, convert_row.spread.median
        bound = e * (1 - replaced) + c * fused
        gain = e - bound
        reached = (e - c) / gain if gain > 0 else float("nan")
        lines.append(f"- {case}, whole-step bound: the parts convert() replaces take {100 * replaced:.1f}% "
                     f"of eager's profiled op time ({e * replaced:.1f} ms of {e:.1f} ms); at the fused ops' "
                     f"measured speed ({100 * fused:.1f}% of eager+convert's, {c * fused:.1f} ms) the step "
                     f"would take {bound:.1f} ms. eager+convert: {c:.1f} ms, {100 * reached:.0f}% of the "
                     f"achievable gain ({gain:.1f} ms)")
    return lines


def plot(rows: list[ResultRow], copy: float | None, path: Path, title: str) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r.case for r in rows if r.gbps is not None))
    if not cases:
        return False
    by_key = {(r.case, r.provider): r for r in rows}
    providers = sorted({r.provider for r in rows if r.gbps is not None}, key=_provider_rank)
    width = 0.8 / len(providers)
    fig, ax = plt.subplots(figsize=(max(8.0, 0.35 * len(cases) * len(providers)), 5.5))
    for i, provider in enumerate(providers):
        found = [(k, by_key[(case, provider)]) for k, case in enumerate(cases) if (case, provider) in by_key]
        gbps = [r.gbps for _, r in found]
        # GB/s at the quartile times: the slower quartile gives the lower bar end.
        low = [g - g * r.spread.median / r.spread.q3 for g, (_, r) in zip(gbps, found, strict=True)]
        high = [g * r.spread.median / r.spread.q1 - g for g, (_, r) in zip(gbps, found, strict=True)]
        ax.bar([k + i * width for k, _ in found], gbps, width, yerr=[low, high], capsize=2, label=provider)
    if copy:
        ax.axhline(copy, color="black", linestyle="--", label=f"copy bandwidth {copy:.0f} GB/s")
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(cases))])
    ax.set_xticklabels(cases, rotation=75, ha="right", fontsize=7)
    ax.set_ylabel("GB/s: ideal bytes / median time (bars: IQR)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def section(runs: list[tuple[dict, dict]], plot_dir: Path | None) -> str:
    meta = runs[0][0]
    device = meta.get("device_name") or meta.get("cpu") or "unknown device"
    kind = "GPU" if meta.get("device") == "cuda" else "CPU"
    title = f"{kind}: {device}"
    rows = pooled_rows(runs)
    copies = [m["copy_GBps"] for m, _ in runs if m.get("copy_GBps")]
    lines = [f"## {title}", "", f"{len(runs)} run(s), pooled:"]
    for m, _ in runs:
        wall = f", session {m['session_wall_s']} s" if m.get("session_wall_s") else ""
        lines.append(f"- `{m['path']}`: {m.get('datetime', '')[:19].replace('T', ' ')} UTC; torch "
                     f"{m.get('torch')}, triton {m.get('triton')}, Python {m.get('python')}; copy "
                     f"bandwidth {m.get('copy_GBps')} GB/s{wall}"
                     + (f"; {m['malloc']}" if m.get("malloc") else ""))
    checks = [*never_slower_lines(rows, "block", "eager", "block sweep"),
              *never_slower_lines(rows, "block", "compile", "compiled block"),
              *never_slower_lines(rows, "resnet50", "eager", "ResNet-50"),
              *never_slower_lines(rows, "resnet50", "compile", "compiled ResNet-50"),
              *overhead_lines(rows), *step_bound_lines(runs, rows)]
    lines += ["", f"Copy bandwidth (median of the runs): {statistics.median(copies):.1f} GB/s." if copies
              else "Copy bandwidth: not measured.", "", *headline(rows), "",
              *(["Issue 21 checks (never slower than what a fused case replaces; per-call overhead; "
                 "the whole-step bound):", "", *checks, ""] if checks else [])]
    if plot_dir is not None:
        png = plot_dir / f"{kind.lower()}.png"
        if plot(rows, statistics.median(copies) if copies else None, png, title):
            lines += [f"![effective GB/s per case]({png})", ""]
    lines += results_table(rows)
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("json", type=Path, nargs="+", help="runs; files of the same device are pooled")
    parser.add_argument("--results", type=Path, help="write a whole RESULTS.md from the JSON files")
    parser.add_argument("--plot-dir", type=Path, help="folder for one PNG per device (cpu.png, gpu.png)")
    args = parser.parse_args()
    if args.plot_dir is not None:
        args.plot_dir.mkdir(parents=True, exist_ok=True)
    devices: dict[tuple, list[tuple[dict, dict]]] = defaultdict(list)
    for path in args.json:
        meta, cases = load(path)
        devices[(meta.get("device"), meta.get("device_name"))].append((meta, cases))
    text = "\n".join(section(runs, args.plot_dir) for runs in devices.values())
    if args.results is not None:
        intro = ["# Results", "",
                 "Generated by `scripts/bench_report.py` from pytest-benchmark JSON files written by "
                 "`pytest benchmarks/ --benchmark-only`; nothing here is typed in. Regenerate the CPU "
                 f"section with `{REGENERATE}`; the GPU one from the gpu.json of "
                 "`bash scripts/gpu_check.sh`. "
                 "Times are per round (one call, device synchronised): median, interquartile range and "
                 "min-max over every round of every run, and the lowest and highest per-run median. "
                 "Effective GB/s use `fused_residual.bench_utils.ideal_bytes` (forward: read input and "
                 "residual, write output; forward+backward adds grad_out and input reads, grad_input "
                 "and grad_residual writes, and the 1-bit mask). Speedups are ratios of medians against "
                 "eager PyTorch and a torch.compile(fullgraph=True, dynamic=False) baseline compiled "
                 "afresh for each case and warmed up (benchmarks/bench_common.py). On Linux the benchmark "
                 "session keeps freed memory in glibc's malloc (mmap threshold 32 MiB, trim threshold "
                 "1 GiB; `bench_common.keep_freed_memory`), for every provider alike, so that page faults "
                 "from buffers returned to the kernel and mapped again do not land on whichever provider's "
                 "allocation pattern triggers them; per-call overhead rows time (2, 4, 2, 2) float32 "
                 "tensors on one thread, 100 calls per round.", ""]
        if "cuda" not in {device for device, _ in devices}:
            intro += ["## GPU", "", "Not measured yet: no GPU run of `bash scripts/gpu_check.sh` has "
                      "been made. No GPU figure is claimed anywhere in this project until one is.", ""]
        args.results.write_text("\n".join(intro) + "\n" + text)
    print(text)


if __name__ == "__main__":
    main()
