"""The synchronized fused tail (SyncBatchNormAddReLU2d, sync_bn_add_relu, sync_dual_bn_add_relu,
convert_sync_batchnorm).

Multi-process checks run in spawned gloo process groups of 2 and 3 CPU processes (one job per
world size, every check of that size in the same group: tests/sync_worker.py, the checks in
sync_checks.py and sync_module_checks.py), each reported here as its own test. On a machine
with two GPUs the same checks, plus a comparison with nn.SyncBatchNorm + add + ReLU, run over
NCCL. The rest runs in this process: no process group (exactly the single-device op), the
statistics merge, argument errors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from helpers import EXAMPLE_CLASSES, make_case
from sync_cases import run, single_fn
from sync_worker import checks_for

import fused_residual
from fused_residual.distributed.collectives import merge_moments, pack_moments, update_running_stats
from fused_residual.reference import bn_update_running_stats_reference

WORKER = os.path.join(os.path.dirname(__file__), "sync_worker.py")
GLOO = dist.is_available() and dist.is_gloo_available()
needs_gloo = pytest.mark.skipif(not GLOO, reason="torch.distributed with gloo is unavailable here")
GPUS = torch.cuda.device_count()


def run_job(world: int, out, checks: list[str] | None = None, dist_backend: str = "gloo",
            timeout: float = 900, group_timeout: float = 300) -> dict:
    """Run the worker; returns {"rc", "log", "ranks": {rank: {check: result}}}."""
    cmd = [sys.executable, WORKER, "--world", str(world), "--out", str(out), "--dist-backend",
           dist_backend, "--timeout", str(group_timeout)]
    if checks:
        cmd += ["--checks", ",".join(checks)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ))
    ranks = {}
    for rank in range(world):
        path = os.path.join(out, f"rank{rank}.json")
        if os.path.exists(path):
            with open(path) as f:
                ranks[rank] = json.load(f)
    return {"rc": done.returncode, "log": done.stdout[-3000:] + done.stderr[-3000:], "ranks": ranks}


def assert_check_passed(job: dict, name: str, world: int) -> None:
    assert len(job["ranks"]) == world, f"job exited {job['rc']} without every rank's results:\n{job['log']}"
    failed = {rank: results.get(name, "not run") for rank, results in job["ranks"].items()
              if results.get(name) != "ok"}
    assert not failed, "\n".join(f"--- rank {rank}:\n{error}" for rank, error in failed.items())


@pytest.fixture(scope="module")
def job2(tmp_path_factory):
    return run_job(2, tmp_path_factory.mktemp("sync2"))


@pytest.fixture(scope="module")
def job3(tmp_path_factory):
    return run_job(3, tmp_path_factory.mktemp("sync3"))


@pytest.fixture(scope="module")
def job_nccl(tmp_path_factory):
    return run_job(2, tmp_path_factory.mktemp("nccl"), dist_backend="nccl")


@needs_gloo
@pytest.mark.parametrize("name", checks_for(2, "cpu"))
def test_world_size_2(job2, name):
    assert_check_passed(job2, name, 2)


@needs_gloo
@pytest.mark.parametrize("name", checks_for(3, "cpu"))
def test_world_size_3(job3, name):
    assert_check_passed(job3, name, 3)


@pytest.mark.skipif(GPUS < 2 or not (dist.is_available() and dist.is_nccl_available()),
                    reason=f"the NCCL checks need two GPUs and NCCL; this machine has {GPUS} GPU(s)")
@pytest.mark.parametrize("name", checks_for(2, "cuda"))
def test_nccl_world_size_2(job_nccl, name):
    assert_check_passed(job_nccl, name, 2)


@needs_gloo
@pytest.mark.parametrize("world", [2, 3])
def test_empty_rank_does_not_deadlock(tmp_path, world):
    """Rank 1 has no rows for three training steps (module, dual, no_grad) and an eval step;
    a rank left waiting in a collective would fail at the group timeout (300 s: sized for a
    loaded 2-core machine, where a legitimate wait can take a minute), and the job must
    finish within the subprocess timeout."""
    job = run_job(world, tmp_path, ["empty_rank_steps"], timeout=900, group_timeout=300)
    assert_check_passed(job, "empty_rank_steps", world)


AUDITED_EXAMPLE = os.path.join(os.path.dirname(__file__), "audited_example.py")


@needs_gloo
def test_example_sync_under_torchrun():
    """examples/train_resnet.py --sync under torchrun, 2 CPU processes over gloo, a few steps at
    tiny sizes: it runs, rank 0 alone prints, and the example's own checks pass (exit 0): the
    first step of both synchronized models against the original model on the whole batch in
    float64 (the logits under the contract's rule over many values, 1024 per rank at
    EXAMPLE_CLASSES classes, the loss under the bound
    that follows from it), and the loss curves; and on every rank every fused op the
    synchronized converted model runs meets its derived bound (tests/audited_example.py)."""
    pytest.importorskip("torchvision")
    if torch.__version__ < "2.12":  # torch.__version__ is a TorchVersion: compared as a version
        pytest.skip("under torch 2.11, torchrun did not exit after this example had finished and printed "
                    "every check, late in a full test session (twice, CI's old-torch leg; cause not "
                    "found); alone it passes there in 18 s, and it runs in the newest-torch leg")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           AUDITED_EXAMPLE, "--sync", "--steps", "3", "--warmup", "1", "--batch-size", "4",
           "--image-size", "16", "--classes", str(EXAMPLE_CLASSES)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]
    assert "2 ranks (gloo), synchronized BatchNorm under DDP" in out
    assert out.count("first step logits: error against float64") == 1
    assert "first step loss: error against float64" in out and "FAIL" not in out
    assert "the logits' bound through the loss" in out
    for rank in range(2):  # the audit's report of each rank (torchrun forwards both outputs)
        assert f"rank {rank}: " in out and "fused op calls within their bounds" in out, out[-3000:]


@pytest.mark.parametrize("env, args, message", [
    ({}, ["--sync"], "--sync runs under torchrun"),
    ({"WORLD_SIZE": "3", "LOCAL_RANK": "0"}, ["--sync", "--batch-size", "4"],
     "--batch-size (4) must be a multiple of the number of ranks (3)"),
])
def test_example_sync_arguments(monkeypatch, capsys, env, args, message):
    pytest.importorskip("torchvision")
    from test_example import load_example

    for name in ("WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exc:
        load_example().parse_args(args)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_without_process_group_is_the_single_device_op():
    """No initialized process group: the module and the functionals are exactly
    BatchNormAddReLU2d / bn_add_relu / dual_bn_add_relu (bitwise), with no collective."""
    assert not dist.is_initialized()
    x, r, w, b, rm, rv = make_case((3, 4, 5, 5), torch.float32, "channels_last")
    for train in (True, False):
        got = run(single_fn(fused_residual.sync_bn_add_relu, train), dict(input=x, residual=r, weight=w,
                  bias=b), [rm, rv], torch.ones_like(x))
        want = run(single_fn(fused_residual.bn_add_relu, train), dict(input=x, residual=r, weight=w,
                   bias=b), [rm, rv], torch.ones_like(x))
        assert (got.forward_calls, got.backward_calls) == ([], [])
        assert torch.equal(got.out, want.out)
        for key, value in got.grads.items():
            assert torch.equal(value, want.grads[key]), key
        for s, t in zip(got.stats, want.stats, strict=True):
            assert torch.equal(s, t)
    sync = fused_residual.SyncBatchNormAddReLU2d(4, momentum=None)
    plain = fused_residual.BatchNormAddReLU2d(4, momentum=None)
    for _ in range(2):
        assert torch.equal(sync(x, r), plain(x, r))
    assert torch.equal(sync.running_var, plain.running_var) and int(sync.num_batches_tracked) == 2
    out = fused_residual.sync_dual_bn_add_relu(x, rm.clone(), rv.clone(), w, b, r, rm.clone(), rv.clone(),
                                               training=True)
    want = fused_residual.dual_bn_add_relu(x, rm.clone(), rv.clone(), w, b, r, rm.clone(), rv.clone(),
                                           training=True)
    assert torch.equal(out, want)


def test_module_is_a_sync_batchnorm():
    m = fused_residual.SyncBatchNormAddReLU2d(6, eps=1e-3, momentum=None, affine=False, backend="reference")
    assert isinstance(m, nn.SyncBatchNorm) and m.process_group is None
    assert list(m.state_dict()) == list(nn.SyncBatchNorm(6, affine=False).state_dict())
    full = fused_residual.SyncBatchNormAddReLU2d(6)
    full.load_state_dict(nn.SyncBatchNorm(6).state_dict())
    assert "backend='auto'" in repr(full)


def test_convert_sync_batchnorm_in_place():
    block = fused_residual.FusedResidualBlock(3, 4, backend="reference")
    params = [id(p) for p in block.parameters()]
    keys = list(block.state_dict())
    group = object()  # any process group object is stored as given
    assert fused_residual.convert_sync_batchnorm(block, process_group=group) is block
    assert type(block.bn1) is fused_residual.SyncBatchNormAddReLU2d and block.bn1.backend == "reference"
    assert block.bn2.process_group is group
    assert [id(p) for p in block.parameters()] == params and list(block.state_dict()) == keys


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda: fused_residual.SyncBatchNormAddReLU2d(3)(torch.randn(2, 3, 4)), ValueError, "4D input"),
        (lambda: fused_residual.SyncBatchNormAddReLU2d(3, backend="nope"), ValueError, "unknown backend"),
        (lambda: fused_residual.convert_sync_batchnorm(3), TypeError, "nn.Module"),
        (lambda: fused_residual.sync_bn_add_relu(torch.randn(1, 3, 1, 1), None, None, None, training=True),
         ValueError, "more than 1 value per channel"),
    ],
)
def test_bad_arguments(call, error, words):
    with pytest.raises(error, match=words):
        call()


def test_merge_matches_the_whole_batch_and_does_not_cancel():
    """merge_moments of per-rank (count, mean, var) rows: the float64 statistics of the whole
    batch, with an empty rank, and at a mean of 1e8 with unit variance, where
    E[x^2] - E[x]^2 in float64 loses every digit."""
    g = torch.Generator().manual_seed(0)
    # At 1e8 the data themselves are stored to 1.5e-8 (one float64 ulp): both two-pass
    # variances agree to that, the naive formula's error is of order 1.
    for offset, rtol in ((0.0, 1e-12), (1e8, 1e-7)):
        parts = [torch.randn(n, 5, dtype=torch.float64, generator=g) + offset for n in (7, 0, 3, 12)]
        rows = []
        for p in parts:
            moments = [torch.var_mean(p, dim=0, unbiased=False)[::-1]] if p.shape[0] else []
            rows.append(pack_moments(p.shape[0], moments, 1, 5, p.device))
        total, [(mean, var)] = merge_moments(torch.stack(rows), 1, 5, torch.float64)
        whole = torch.cat(parts)
        want_var, want_mean = torch.var_mean(whole, dim=0, unbiased=False)
        assert total.item() == whole.shape[0]
        torch.testing.assert_close(mean, want_mean, rtol=1e-15, atol=0)
        torch.testing.assert_close(var, want_var, rtol=rtol, atol=1e-12)
    naive = (whole * whole).mean(0) - whole.mean(0) ** 2
    assert (naive - want_var).abs().max() > 1e-3  # the formula the merge avoids


def test_merge_of_empty_ranks_and_running_stats():
    total, [(mean, var)] = merge_moments(torch.zeros(3, 1 + 2 * 4, dtype=torch.float64), 1, 4, torch.float32)
    assert total.item() == 0 and torch.equal(mean, torch.zeros(4)) and torch.equal(var, torch.zeros(4))
    rm, rv = torch.randn(4), torch.rand(4) + 0.5
    before = (rm.clone(), rv.clone())
    update_running_stats(mean, var, total, rm, rv, 0.1)
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])  # no values: unchanged
    mean, var = torch.randn(4), torch.rand(4)
    want_m, want_v = before[0].clone(), before[1].clone()
    bn_update_running_stats_reference(mean, var, 10, want_m, want_v, 0.1)
    update_running_stats(mean, var, torch.tensor(10.0, dtype=torch.float64), rm, rv, 0.1)
    torch.testing.assert_close(rm, want_m, rtol=0, atol=1e-7)
    torch.testing.assert_close(rv, want_v, rtol=1e-6, atol=1e-7)
