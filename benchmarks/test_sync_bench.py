"""The synchronized tail on CPU over gloo, 2 processes: training forward+backward of
relu(SyncBatchNorm(x) + r) at (16, 64, 56, 56) float32 per rank.

Providers, same run: "eager" (PyTorch's own SyncBatchNorm algorithm: per-rank statistics,
all_gather, count-weighted merge, normalize; backward sums, all_reduce, elementwise; then add
and ReLU; `fused_residual.distributed.reference`, as nn.SyncBatchNorm refuses CPU tensors),
the fused synchronized tail (`sync_bn_add_relu` with the fused backend), and the same fused
tail unsynchronized (`bn_add_relu`): the cost of synchronization.

This pytest process is rank 0 and times the calls; a peer process (this file run as a script,
`--peer`) is rank 1 and makes the same calls on its own batch, one per call of rank 0: before
each call rank 0 broadcasts which case and provider to run (outside the timed region: it is
pytest-benchmark's `setup`). Run: `pytest benchmarks/test_sync_bench.py --benchmark-only`;
`--benchmark-disable` runs each case once.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from bench_common import record

import fused_residual
from fused_residual.backends import resolve_backend
from fused_residual.bench_utils import ideal_bytes, make_tail_problem, tail_callable

SHAPE = (16, 64, 56, 56)
CASES = [(SHAPE, torch.float32, False), (SHAPE, torch.float32, True)]  # (shape, dtype, channels_last)
FUSED = resolve_backend("auto", "cpu")
PROVIDERS = ["eager", *([FUSED, f"{FUSED} unsynchronized"] if FUSED != "reference" else [])]
ROUNDS, WARMUP = 15, 3
THREADS = max(1, (os.cpu_count() or 2) // 2)  # per process: the two ranks share the machine
RUN, EXIT = 1, -1


def case_id(case) -> str:
    shape, dtype, channels_last = case
    layout = "channels_last" if channels_last else "NCHW"
    dtype_name = str(dtype).removeprefix("torch.")
    return f"sync bn_add_relu {'x'.join(map(str, shape))} {dtype_name} {layout} gloo x2"


def forward_for(provider: str):
    if provider.endswith("unsynchronized"):
        def unsynchronized(x, r, rm, rv, w, b, training):
            return fused_residual.bn_add_relu(x, r, rm, rv, w, b, training, backend=FUSED)
        return unsynchronized
    backend = "reference" if provider == "eager" else provider

    def synchronized(x, r, rm, rv, w, b, training):
        return fused_residual.sync_bn_add_relu(x, r, rm, rv, w, b, training, backend=backend)
    return synchronized


def one_call(case_index: int, provider_index: int, cache: dict):
    """The no-argument training step of a (case, provider), built once per process."""
    key = (case_index, provider_index)
    if key not in cache:
        shape, dtype, channels_last = CASES[case_index]
        problem = make_tail_problem(shape, dtype, channels_last, "cpu")
        cache[key] = tail_callable(problem, "train_fwdbwd", forward_for(PROVIDERS[provider_index]))
    return cache[key]


def command(case_index: int, provider_index: int, action: int) -> None:
    dist.broadcast(torch.tensor([case_index, provider_index, action]), src=0)


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    """Rank 1 in a subprocess, this process rank 0 of a 2-process gloo group, for the module."""
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is unavailable here")
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this pytest process")
    init = str(tmp_path_factory.mktemp("sync_bench") / "init")
    proc = subprocess.Popen([sys.executable, __file__, "--peer", init], env=dict(os.environ))
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=2,
                            timeout=datetime.timedelta(seconds=300))
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        yield {}
    finally:
        command(0, 0, EXIT)
        proc.wait(timeout=120)
        dist.destroy_process_group()
        torch.set_num_threads(threads)
    assert proc.returncode == 0, f"the peer process exited with {proc.returncode}"


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_sync_tail(benchmark, copy_gbps, peer, case, provider):
    case_index, provider_index = CASES.index(case), PROVIDERS.index(provider)
    run = one_call(case_index, provider_index, peer)
    benchmark.group = f"{case_id(case)} train_fwdbwd"
    benchmark.pedantic(run, setup=lambda: command(case_index, provider_index, RUN), rounds=ROUNDS,
                       warmup_rounds=WARMUP, iterations=1)
    shape, dtype, _ = case
    numel = shape[0] * shape[1] * shape[2] * shape[3]
    nbytes = ideal_bytes("train_fwdbwd", numel, dtype.itemsize, residual=True)
    ms = benchmark.stats.stats.median * 1e3 if benchmark.stats is not None else None
    extra = {"ideal_bytes": nbytes, "copy_GBps": round(copy_gbps, 1), "processes": 2,
             "threads_per_process": THREADS}
    if ms:
        extra["GBps"] = round(nbytes / ms / 1e6, 1)
        extra["pct_of_copy"] = round(100 * extra["GBps"] / copy_gbps, 1)
    record(benchmark.group, provider, benchmark, extra)


def serve(init: str) -> None:
    """Rank 1: run one call of whatever rank 0 names, until told to exit."""
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=1, world_size=2,
                            timeout=datetime.timedelta(seconds=300))
    torch.set_num_threads(THREADS)
    cache: dict = {}
    while True:
        cmd = torch.zeros(3, dtype=torch.int64)
        dist.broadcast(cmd, src=0)
        case_index, provider_index, action = cmd.tolist()
        if action == EXIT:
            break
        one_call(case_index, provider_index, cache)()
    dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--peer", required=True, help="the file:// rendezvous of rank 0")
    serve(parser.parse_args().peer)
