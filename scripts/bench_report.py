"""Turn a pytest-benchmark JSON (benchmarks/) into a Markdown table and a GB/s plot.

    python scripts/bench_report.py results.json --markdown results.md --plot results.png

The table has one row per case (shape x dtype x layout x mode) and, per provider, ms,
GB/s, % of the copy bandwidth and speedups over eager and torch.compile, all read from the
JSON's extra_info (written by benchmarks/bench_common.py). The plot shows effective GB/s of
each provider per case, with the measured copy bandwidth as a horizontal line.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def load(path: Path) -> tuple[dict, dict[str, dict[str, dict]]]:
    data = json.loads(path.read_text())
    cases: dict[str, dict[str, dict]] = defaultdict(dict)
    for bench in data["benchmarks"]:
        provider = bench["params"]["provider"]
        info = dict(bench.get("extra_info", {}))
        info.setdefault("ms", bench["stats"]["median"] * 1e3)
        cases[bench["group"]][provider] = info
    return data.get("machine_info", {}), cases


def markdown(machine: dict, cases: dict[str, dict[str, dict]], title: str) -> str:
    lines = [f"### {title}", ""]
    if machine:
        lines += [f"Machine: {machine.get('node', '?')}, {machine.get('cpu', {}).get('brand_raw', '')}", ""]
    lines += ["| case | provider | ms | GB/s | % of copy | vs eager | vs compile |",
              "|---|---|---:|---:|---:|---:|---:|"]
    def cell(info: dict, key: str, fmt: str) -> str:
        value = info.get(key)
        return "" if value is None else format(value, fmt)

    for case, providers in cases.items():
        for provider, info in providers.items():
            lines.append(f"| {case} | {provider} | {cell(info, 'ms', '.3f')} | {cell(info, 'GBps', '.1f')} | "
                         f"{cell(info, 'pct_of_copy', '.0f')} | {cell(info, 'speedup_vs_eager', '.2f')} | "
                         f"{cell(info, 'speedup_vs_compile', '.2f')} |")
    return "\n".join(lines) + "\n"


def plot(cases: dict[str, dict[str, dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(case, providers) for case, providers in cases.items()
            if any("GBps" in info for info in providers.values())]
    if not rows:
        return
    providers = sorted({p for _, ps in rows for p in ps},
                       key=lambda p: ["eager", "compile", "extension", "triton"].index(p)
                       if p in ("eager", "compile", "extension", "triton") else 9)
    width = 0.8 / len(providers)
    fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(rows) * len(providers) / 2), 5))
    for i, provider in enumerate(providers):
        xs = [k + i * width for k in range(len(rows))]
        ys = [ps.get(provider, {}).get("GBps", 0) for _, ps in rows]
        ax.bar(xs, ys, width, label=provider)
    copy = next((info["copy_GBps"] for _, ps in rows for info in ps.values() if "copy_GBps" in info), None)
    if copy:
        ax.axhline(copy, color="black", linestyle="--", label=f"copy bandwidth {copy:.0f} GB/s")
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(rows))])
    ax.set_xticklabels([case for case, _ in rows], rotation=75, ha="right", fontsize=7)
    ax.set_ylabel("effective GB/s (ideal bytes / time)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("json", type=Path)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--title", default="fused_residual benchmarks")
    args = parser.parse_args()
    machine, cases = load(args.json)
    text = markdown(machine, cases, args.title)
    if args.markdown:
        args.markdown.write_text(text)
    if args.plot:
        plot(cases, args.plot, args.title)
    print(text)


if __name__ == "__main__":
    main()
