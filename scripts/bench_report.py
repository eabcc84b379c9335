"""Turn pytest-benchmark JSON files (from benchmarks/) into Markdown tables, plots and RESULTS.md.

    pytest benchmarks/ --benchmark-only --benchmark-json=results/cpu.json
    python scripts/bench_report.py results/cpu.json [results/gpu.json] \\
        --results RESULTS.md --plot-dir results

Per JSON: one table row per case (shape x dtype x layout x mode) and provider with ms, GB/s,
% of the copy bandwidth and speedups over eager and torch.compile (all read from the
`extra_info` that benchmarks/bench_common.py writes), a headline (geometric-mean speedups of
each fused backend over eager and torch.compile, training forward+backward), and a PNG of
effective GB/s per case with the measured copy bandwidth as a line. Every number comes from
the JSON; none is typed in. With `--results`, RESULTS.md is written whole from them; a
device without a JSON is listed as "not measured yet".
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

PROVIDER_ORDER = ["eager", "compile", "extension", "triton"]


def load(path: Path) -> tuple[dict, dict[str, dict[str, dict]]]:
    data = json.loads(path.read_text())
    meta = dict(data.get("machine_info", {}).get("fused_residual", {}))
    meta["datetime"] = data.get("datetime", "")
    meta["cpu"] = data.get("machine_info", {}).get("cpu", {}).get("brand_raw", "")
    meta["python"] = data.get("machine_info", {}).get("python_version", "")
    cases: dict[str, dict[str, dict]] = defaultdict(dict)
    for bench in data["benchmarks"]:
        info = dict(bench.get("extra_info", {}))
        info.setdefault("ms", bench["stats"]["median"] * 1e3)
        cases[bench["group"]][bench["params"]["provider"]] = info
    return meta, cases


def _cell(info: dict, key: str, fmt: str) -> str:
    value = info.get(key)
    return "" if value is None else format(value, fmt)


def table(cases: dict[str, dict[str, dict]]) -> str:
    lines = ["| case | provider | ms | GB/s | % of copy | vs eager | vs compile |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for case, providers in cases.items():
        for provider in sorted(providers, key=_provider_rank):
            info = providers[provider]
            cells = [case, provider, _cell(info, "ms", ".3f"), _cell(info, "GBps", ".1f"),
                     _cell(info, "pct_of_copy", ".0f"), _cell(info, "speedup_vs_eager", ".2f"),
                     _cell(info, "speedup_vs_compile", ".2f")]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _provider_rank(provider: str) -> int:
    return PROVIDER_ORDER.index(provider) if provider in PROVIDER_ORDER else len(PROVIDER_ORDER)


def headline(cases: dict[str, dict[str, dict]], mode: str = "train_fwdbwd") -> list[str]:
    """Geometric-mean speedup of each fused provider over eager and compile, over `mode` cases."""
    lines = []
    fused = sorted({p for ps in cases.values() for p in ps} - {"eager", "compile"}, key=_provider_rank)
    for provider in fused:
        for baseline in ("eager", "compile"):
            ratios = [ps[provider][f"speedup_vs_{baseline}"] for case, ps in cases.items()
                      if case.endswith(mode) and provider in ps and f"speedup_vs_{baseline}" in ps[provider]]
            if ratios:
                geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
                lines.append(f"- {provider} vs {baseline}, {mode}: geometric mean {geo:.2f}x over "
                             f"{len(ratios)} case(s), min {min(ratios):.2f}x, max {max(ratios):.2f}x")
    return lines


def plot(cases: dict[str, dict[str, dict]], path: Path, title: str) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(case, ps) for case, ps in cases.items() if any("GBps" in info for info in ps.values())]
    if not rows:
        return False
    providers = sorted({p for _, ps in rows for p in ps}, key=_provider_rank)
    width = 0.8 / len(providers)
    fig, ax = plt.subplots(figsize=(max(8.0, 0.35 * len(rows) * len(providers)), 5.5))
    for i, provider in enumerate(providers):
        xs = [k + i * width for k in range(len(rows))]
        ax.bar(xs, [ps.get(provider, {}).get("GBps", 0) for _, ps in rows], width, label=provider)
    copy = next((info["copy_GBps"] for _, ps in rows for info in ps.values()
                 if info.get("copy_GBps") == info.get("copy_GBps") and info.get("copy_GBps")), None)
    if copy:
        ax.axhline(copy, color="black", linestyle="--", label=f"copy bandwidth {copy:.0f} GB/s")
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(rows))])
    ax.set_xticklabels([case for case, _ in rows], rotation=75, ha="right", fontsize=7)
    ax.set_ylabel("effective GB/s (ideal bytes / median time)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def section(path: Path, plot_dir: Path | None) -> str:
    meta, cases = load(path)
    device = meta.get("device_name") or meta.get("cpu") or "unknown device"
    kind = "GPU" if meta.get("device") == "cuda" else "CPU"
    title = f"{kind}: {device}"
    lines = [f"## {title}", "",
             f"- measured {meta.get('datetime', '')[:19].replace('T', ' ')} UTC; torch {meta.get('torch')}, "
             f"triton {meta.get('triton')}, Python {meta.get('python')}",
             f"- copy bandwidth measured in the same run: {meta.get('copy_GBps')} GB/s",
             f"- command: `pytest benchmarks/ --benchmark-only --benchmark-json={path}`, then "
             f"`python scripts/bench_report.py {path} ...`", ""]
    lines += [*headline(cases), ""]
    if any(info.get("pct_of_copy", 0) > 100 for ps in cases.values() for info in ps.values()):
        lines += ["Above 100% of the copy bandwidth: a case's tensors (tens of MB) partly stay in the "
                  "caches between its passes, while the copy measurement streams 256 MiB "
                  "(1 GiB on a GPU) past them.", ""]
    if plot_dir is not None:
        png = plot_dir / (path.stem + ".png")
        if plot(cases, png, title):
            lines += [f"![effective GB/s per case]({png})", ""]
    lines.append(table(cases))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("json", type=Path, nargs="+")
    parser.add_argument("--results", type=Path, help="write a whole RESULTS.md from the JSON files")
    parser.add_argument("--plot-dir", type=Path, help="folder for one PNG per JSON")
    args = parser.parse_args()
    if args.plot_dir is not None:
        args.plot_dir.mkdir(parents=True, exist_ok=True)
    sections = [section(path, args.plot_dir) for path in args.json]
    text = "\n".join(sections)
    if args.results is not None:
        kinds = [load(path)[0].get("device") for path in args.json]
        intro = ["# Results", "",
                 "Generated by `scripts/bench_report.py` from pytest-benchmark JSON files written by "
                 "`pytest benchmarks/ --benchmark-only`; nothing here is typed in. Effective GB/s use "
                 "`fused_residual.bench_utils.ideal_bytes` (forward: read input and residual, write "
                 "output; forward+backward adds grad_out and input reads, grad_input and "
                 "grad_residual writes, and the 1-bit mask). Speedups are against eager PyTorch and "
                 "`torch.compile(dynamic=False)` of the same function, in the same run.", ""]
        if "cuda" not in kinds:
            intro += ["## GPU", "", "Not measured yet: no GPU run of `bash scripts/gpu_check.sh` has "
                      "been made. No GPU figure is claimed anywhere in this project until one is.", ""]
        args.results.write_text("\n".join(intro) + "\n" + text)
    print(text)


if __name__ == "__main__":
    main()
