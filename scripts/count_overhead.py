"""Instructions per call of the host-overhead cases (benchmarks/test_overhead_bench.py), counted
by valgrind's callgrind: the load-independent twin of that benchmark's µs rows, for a machine
whose wall times are noise (a shared CI box) and for comparing two trees exactly.

    python scripts/count_overhead.py                 # every case, this checkout's fused_residual
    python scripts/count_overhead.py --calls 200 --case bn_add_relu:train_fwdbwd

Each case (api x mode, as the benchmark builds it: (2, 4, 2, 2) float32, one intra-op thread)
is warmed up uninstrumented, then `--calls` calls run with callgrind's instrumentation on;
the figure is their instruction count / calls (deterministic to a few hundred instructions;
no cache simulation). Needs valgrind and its headers (the client requests that switch the
instrumentation on and off around the timed calls are compiled into a small helper library
with `cc`). Import and warm-up run uninstrumented, so a run takes a few minutes, not an hour.
`--tree DIR` counts another checkout's fused_residual (and its benchmark's cases): A vs B.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
APIS = ("bn_add_relu", "BatchNormAddReLU2d")
MODES = ("eval_fwd", "train_fwdbwd")
WARMUP = 30

_CLIENT_REQUESTS = r"""
#include <valgrind/callgrind.h>
void start(void) { CALLGRIND_START_INSTRUMENTATION; CALLGRIND_ZERO_STATS; }
void stop(const char* name) { CALLGRIND_DUMP_STATS_AT(name); CALLGRIND_STOP_INSTRUMENTATION; }
"""


def _client_library(workdir: Path) -> ctypes.CDLL:
    src, lib = workdir / "client.c", workdir / "client.so"
    src.write_text(_CLIENT_REQUESTS)
    subprocess.run(["cc", "-O1", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    return ctypes.CDLL(str(lib))


def _measure(tree: Path, cases: list[tuple[str, str]], providers: list[str], calls: int,
             workdir: Path) -> None:
    """Child side (under valgrind): one dump per (case, provider), named `api mode provider`."""
    sys.path[:0] = [str(tree), str(tree / "benchmarks")]
    import torch

    torch.set_num_threads(1)
    import test_overhead_bench as bench

    client = _client_library(workdir)
    for api, mode in cases:
        for provider in providers:
            run = bench._call(api, provider, mode)
            for _ in range(WARMUP):
                run()
            client.start()
            for _ in range(calls):
                run()
            client.stop(f"{api} {mode} {provider}".encode())


def _totals(out_prefix: Path) -> dict[str, int]:
    """`api mode provider` -> instructions, from callgrind's dump files."""
    found = {}
    for path in sorted(out_prefix.parent.glob(out_prefix.name + ".*")):
        name = total = None
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("desc: Trigger: Client Request: "):
                name = line.removeprefix("desc: Trigger: Client Request: ")
            elif line.startswith(("summary:", "totals:")):
                total = int(line.split()[1])
        if name is not None and total is not None:
            found[name] = total
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--case", action="append", metavar="API:MODE",
                        help="e.g. bn_add_relu:train_fwdbwd (repeatable; default: all four)")
    parser.add_argument("--provider", action="append", help="default: eager and extension")
    parser.add_argument("--tree", type=Path, default=ROOT, help="checkout to count (default: this one)")
    parser.add_argument("--child", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cases = [tuple(c.split(":")) for c in args.case] if args.case else [(a, m) for a in APIS for m in MODES]
    providers = args.provider or ["eager", "extension"]
    if args.child:
        _measure(args.tree.resolve(), cases, providers, args.calls, Path(args.child))
        return
    with tempfile.TemporaryDirectory() as tmp:
        prefix = Path(tmp) / "callgrind.out"
        command = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={prefix}",
                   sys.executable, __file__, "--child", tmp, "--calls", str(args.calls),
                   "--tree", str(args.tree)]
        command += [f"--case={a}:{m}" for a, m in cases] + [f"--provider={p}" for p in providers]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        totals = _totals(prefix)
    print(f"instructions per call ({args.calls} calls, callgrind), fused_residual from {args.tree}")
    for api, mode in cases:
        per_call = {p: totals[f"{api} {mode} {p}"] / args.calls for p in providers}
        cells = "  ".join(f"{p} {v / 1e3:7.1f}K" for p, v in per_call.items())
        ratios = "".join(f"  {p}/eager {v / per_call['eager']:.3f}x" for p, v in per_call.items()
                         if p != "eager" and "eager" in per_call)
        print(f"{api:20s} {mode:13s} {cells}{ratios}")


if __name__ == "__main__":
    main()
