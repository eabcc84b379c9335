"""Spawned-process checks of the synchronized fused tail (used by tests/test_sync.py).

`python tests/sync_worker.py --world 2 --out DIR [--checks a,b] [--dist-backend gloo]` starts
`world` processes in one process group (gloo on CPU, or NCCL with one GPU per rank) and runs
every check registered for that world size (sync_checks.py, sync_module_checks.py) in each, in
order, reusing the group; each rank writes DIR/rank<r>.json mapping check name -> "ok" or the
error. The group's timeout (300 s by default: on a loaded 2-core machine a rank may wait
that long in a collective while another compiles or is descheduled) makes a rank left waiting
in a collective fail instead of hanging, well within test_sync's job timeout.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
import sync_convert_checks  # noqa: F401  (registers its checks)
import sync_module_checks  # noqa: F401  (likewise)
from sync_checks import CHECKS, Ctx, checks_for

from fused_residual.backends import resolve_backend


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--checks", default="")
    parser.add_argument("--dist-backend", default="gloo")
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args()
    names = checks_for(args.world, "cuda" if args.dist_backend == "nccl" else "cpu")
    if args.checks:
        names = [n for n in args.checks.split(",") if n]
    init = os.path.join(args.out, "init")
    mp.spawn(run_rank, args=(args, names, init), nprocs=args.world, join=True)


def run_rank(rank: int, args: argparse.Namespace, names: list[str], init: str) -> None:
    torch.set_num_threads(1)
    device = torch.device("cpu")
    if args.dist_backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    dist.init_process_group(args.dist_backend, init_method=f"file://{init}", rank=rank,
                            world_size=args.world, timeout=datetime.timedelta(seconds=args.timeout))
    backend = resolve_backend("auto", device.type)  # the fused backend "auto" runs here
    ctx = Ctx(rank, args.world, device, backend)
    results = {}
    for name in names:
        try:
            CHECKS[name][0](ctx)
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc()
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
