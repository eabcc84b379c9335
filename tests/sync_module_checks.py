"""Checks of SyncBatchNormAddReLU2d, convert_sync_batchnorm, torch.compile and process groups
that tests/sync_worker.py runs in every rank (registered in sync_checks.CHECKS)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from bounds import bn_add_relu_bounds
from helpers import batch_norm_call, relu_as
from sync_cases import (
    CollectiveCounter,
    Run,
    WholeBatch,
    compare_with_whole_batch,
    problem,
    rows_of,
    run,
    single_fn,
)
from sync_checks import FUSED_CALLS, Ctx, check, sync_dual, sync_single
from sync_convert_checks import converted_sync_block

import fused_residual
from fused_residual.modules import batch_norm_state, norm_call_args

C = 3


def init_affine(bn: nn.Module, seed: int = 0) -> nn.Module:
    """Weights away from 1, biases away from 0 (identical on every rank)."""
    if bn.affine:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(bn.num_features, generator=g) * 0.5)
    return bn


def module_run(call, bn: nn.Module, x: torch.Tensor, r: torch.Tensor, grad: torch.Tensor,
               count: bool = True) -> Run:
    """One training step of `call(x, r)` whose BatchNorm is `bn`: a sync_cases.Run. `count`:
    record the collectives (a dispatch mode, which torch.compile refuses to trace under)."""
    x = x.detach().clone().requires_grad_(True)
    r = r.detach().clone().requires_grad_(True)
    bn.zero_grad(set_to_none=True)
    forward, backward = (CollectiveCounter() if count else contextlib.nullcontext() for _ in range(2))
    with forward:
        out = call(x, r)
    with backward:
        out.backward(grad)
    grads = dict(input=x.grad, residual=r.grad, weight=None, bias=None)
    if bn.affine:
        grads.update(weight=bn.weight.grad, bias=bn.bias.grad)
    stats = [bn.running_mean, bn.running_var] if bn.track_running_stats else [None, None]
    return Run(out.detach(), grads, [s.clone() if s is not None else None for s in stats],
               forward.calls if count else [], backward.calls if count else [])


def eager_tail(bn: nn.Module, bits: torch.Tensor | None = None):
    """relu(bn(x) + r), its ReLU decisions `bits` when given (tests/helpers.py, relu_as)."""
    if bits is None:
        return lambda x, r: F.relu(bn(x) + r)
    return lambda x, r: relu_as(bn(x) + r, bits)


def module_whole_batch(sync: nn.Module, eager: nn.Module, truth: nn.Module, prob) -> WholeBatch:
    """The whole-batch side of a module step about to be taken by `sync`: its state now (the
    arguments F.batch_norm gets, its buffers) is where eager (nn.BatchNorm2d in the batch's
    dtype) and truth (in float64) start; the derived bounds of bn_add_relu with them."""
    call = batch_norm_call(sync)
    buffers = [b.detach().clone() for b in sync.buffers()]
    x, r, g = prob.leaves["input"], prob.leaves["residual"], prob.grad

    def evaluate(bits):
        for m in (eager, truth):
            with torch.no_grad():
                for target, source in zip(m.buffers(), buffers, strict=True):
                    target.copy_(source)
        dy = torch.where(bits, g.double(), torch.zeros((), dtype=torch.float64, device=g.device))
        bounds = bn_add_relu_bounds(x, r, dy=dy, split_sums=True, **call)
        return (module_run(eager_tail(truth, bits), truth, x.double(), r.double(), g.double()),
                module_run(eager_tail(eager, bits), eager, x, r, g), bounds)

    return WholeBatch(x.shape, evaluate)


@check(2, 3)
def module_two_steps(ctx: Ctx):
    """SyncBatchNormAddReLU2d on each rank's rows vs nn.BatchNorm2d in float64 on the whole
    batch, under the derived bound, two steps: cumulative momentum (None), affine=False, no
    running stats."""
    sizes = [3, 1] if ctx.world == 2 else [1, 0, 2]
    for kwargs in (dict(momentum=None), dict(affine=False), dict(track_running_stats=False)):
        sync = init_affine(fused_residual.SyncBatchNormAddReLU2d(C, backend=ctx.backend, **kwargs))
        sync.to(ctx.device)
        assert list(sync.state_dict()) == list(nn.SyncBatchNorm(C, **kwargs).state_dict())
        eager = nn.BatchNorm2d(C, **kwargs).to(ctx.device)
        truth = nn.BatchNorm2d(C, **kwargs).to(ctx.device).double()
        for m in (eager, truth):
            m.load_state_dict(sync.state_dict())
        for step in range(2):
            prob = problem(sizes, (C, 4, 5), torch.float32, ctx.device, seed=10 + step)
            leaves, _, grad = prob.slice(ctx.rank)
            whole = module_whole_batch(sync, eager, truth, prob)
            got = module_run(sync, sync, leaves["input"], leaves["residual"], grad)
            compare_with_whole_batch(f"module {kwargs} step {step}", got, whole, sizes, ctx.rank)
            assert (got.forward_calls, got.backward_calls) == FUSED_CALLS
        if sync.track_running_stats:
            assert torch.equal(sync.num_batches_tracked, truth.num_batches_tracked)


@check(2)
def module_eval_makes_no_collective(ctx: Ctx):
    """Eval mode: no collective, exactly the single-device op (bitwise); the same module in
    training makes one collective each way (so the counter does see them)."""
    g = torch.Generator().manual_seed(ctx.rank)
    sync = init_affine(fused_residual.SyncBatchNormAddReLU2d(C, backend=ctx.backend)).to(ctx.device)
    with torch.no_grad():
        sync.running_mean.copy_(torch.randn(C, generator=g))
        sync.running_var.copy_(torch.rand(C, generator=g) + 0.5)
    local = fused_residual.BatchNormAddReLU2d(C, backend=ctx.backend).to(ctx.device)
    local.load_state_dict(sync.state_dict())
    x, r, grad = (torch.randn(2 + ctx.rank, C, 4, 5, generator=g).to(ctx.device) for _ in range(3))
    sync.eval()
    local.eval()
    got, want = module_run(sync, sync, x, r, grad), module_run(local, local, x, r, grad)
    assert (got.forward_calls, got.backward_calls) == ([], []), (got.forward_calls, got.backward_calls)
    assert torch.equal(got.out, want.out)
    for key, value in got.grads.items():
        assert torch.equal(value, want.grads[key]), key
    sync.train()
    got = module_run(sync, sync, x, r, grad)
    assert (got.forward_calls, got.backward_calls) == FUSED_CALLS


def expect_error(fn, words: str) -> None:
    try:
        fn()
    except RuntimeError as exc:
        assert words in str(exc), str(exc)
        return
    raise AssertionError(f"no RuntimeError mentioning {words!r}")


@check(2)
def double_backward_refused(ctx: Ctx):
    """create_graph=True through a synchronized call (fused or reference) raises a clear error
    on every rank, before any collective: no rank is left waiting, and never zeros."""
    g = torch.Generator().manual_seed(ctx.rank)
    x, r, x2 = (torch.randn(2, C, 3, 3, generator=g).to(ctx.device).requires_grad_() for _ in range(3))
    w = torch.ones(C, device=ctx.device, requires_grad=True)
    stats = lambda: (torch.zeros(C, device=ctx.device), torch.ones(C, device=ctx.device))  # noqa: E731
    single = fused_residual.sync_bn_add_relu(x, r, *stats(), w, None, True, backend=ctx.backend)
    dual = fused_residual.sync_dual_bn_add_relu(x, *stats(), w, None, x2, *stats(), w, None, True,
                                                backend=ctx.backend)
    module = fused_residual.SyncBatchNormAddReLU2d(C, backend=ctx.backend).to(ctx.device)
    reference = fused_residual.sync_bn_add_relu(x, r, *stats(), w, None, True, backend="reference")
    for out in (single, dual, module(x, r), reference):
        expect_error(lambda out=out: torch.autograd.grad(out.sum(), (x, w), create_graph=True),
                     "second derivatives")


@check(2)
def no_grad_training_forward(ctx: Ctx):
    """A training forward under no_grad (no mask saved) gives the values and running
    statistics of the one with a graph, with its one collective."""
    sizes = [2, 1]
    prob = problem(sizes, (C, 4, 5), torch.float32, ctx.device, seed=3)
    leaves, stats, grad = prob.slice(ctx.rank)
    with_graph = run(single_fn(fused_residual.sync_bn_add_relu, backend=ctx.backend), leaves, stats, grad)
    stats_copy = [s.clone() for s in stats]
    with torch.no_grad(), CollectiveCounter() as counter:
        out = single_fn(fused_residual.sync_bn_add_relu, backend=ctx.backend)(leaves, stats_copy)
    assert counter.calls == FUSED_CALLS[0], counter.calls
    assert torch.equal(out, with_graph.out)
    for a, b in zip(stats_copy, with_graph.stats, strict=True):
        assert torch.equal(a, b)


@check(2)
def convert_sync_batchnorm_block(ctx: Ctx):
    """convert_sync_batchnorm swaps classes in place (same Parameters, buffers, keys); the
    converted FusedResidualBlock on each rank's rows trains as the original on the whole batch."""
    torch.manual_seed(0)
    block = fused_residual.FusedResidualBlock(C, 4, stride=2, backend=ctx.backend).double().to(ctx.device)
    for bn in (block.bn1, block.bn2):
        init_affine(bn)
    original = copy.deepcopy(block)
    tensors = lambda: [id(t) for t in (*block.parameters(), *block.buffers())]  # noqa: E731
    ids, keys = tensors(), list(block.state_dict())
    assert fused_residual.convert_sync_batchnorm(block) is block
    assert type(block.bn1) is type(block.bn2) is fused_residual.SyncBatchNormAddReLU2d
    assert tensors() == ids and list(block.state_dict()) == keys
    assert block.bn1.process_group is None and block.bn1.backend == ctx.backend
    plain = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), fused_residual.BatchNormAddReLU2d(2))
    fused_residual.convert_sync_batchnorm(plain, process_group=dist.group.WORLD)
    assert type(plain[1]) is nn.SyncBatchNorm and type(plain[2]) is fused_residual.SyncBatchNormAddReLU2d
    assert plain[1].process_group is plain[2].process_group is dist.group.WORLD

    sizes = [3, 2]
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(sum(sizes), C, 8, 8, generator=gen, dtype=torch.float64).to(ctx.device)
    grad = torch.randn(sum(sizes), 4, 4, 4, generator=gen, dtype=torch.float64).to(ctx.device)
    rows = rows_of(sizes, ctx.rank)
    xs = x[rows].clone().requires_grad_()
    block(xs).backward(grad[rows])
    xw = x.clone().requires_grad_()
    out_whole = original(xw)
    out_whole.backward(grad)
    tol = dict(rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(xs.grad, xw.grad[rows], **tol)
    for (name, p), q in zip(block.named_parameters(), original.parameters(), strict=True):
        summed = p.grad.clone()
        dist.all_reduce(summed)
        torch.testing.assert_close(summed, q.grad, **tol, msg=f"grad of {name}")
    for (name, b), c in zip(block.named_buffers(), original.buffers(), strict=True):
        torch.testing.assert_close(b, c, **tol, msg=name)


class SyncNet(nn.Module):
    """conv -> synchronized BN + add + ReLU -> a synchronized dual tail (both autograd.Functions)."""

    def __init__(self, backend: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(C, C, 3, padding=1)
        self.conv2, self.conv3 = nn.Conv2d(C, C, 1), nn.Conv2d(C, C, 1)
        self.bn1, self.bn2, self.bn3 = (
            init_affine(fused_residual.SyncBatchNormAddReLU2d(C, backend=backend), i) for i in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1(self.conv1(x), x)
        a, a3 = norm_call_args(batch_norm_state(self.bn2)), norm_call_args(batch_norm_state(self.bn3))
        return fused_residual.sync_dual_bn_add_relu(
            self.conv2(out), a.running_mean, a.running_var, a.weight, a.bias,
            self.conv3(x), a3.running_mean, a3.running_var, a3.weight, a3.bias, True, a.momentum,
            a.eps, backend=self.bn2.backend)


@check(2)
def compile_training_step(ctx: Ctx):
    """torch.compile(fullgraph=True) traces forward and backward through both synchronized
    Functions with no graph break: the graphs hold the functional collectives (one all_gather
    per tail forward, one all_reduce per tail backward) and the fused ops, and two training
    steps match eager. The same for a torchvision block converted and synchronized (a fused
    bn1 + ReLU and a synchronized dual tail), where torchvision is installed."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs: list[str] = []

    def record(gm, example_inputs):
        graphs.append(gm.code)
        return make_boxed_func(gm.forward)

    torch.manual_seed(0)
    models = [SyncNet(ctx.backend)]
    if converted_sync_block is not None:
        models.append(converted_sync_block(ctx.backend))
    for eager in models:
        eager.to(ctx.device)
        compiled_net = copy.deepcopy(eager)
        compiled = torch.compile(compiled_net, fullgraph=True, dynamic=False,
                                 backend=aot_autograd(fw_compiler=record, bw_compiler=record))
        g = torch.Generator().manual_seed(ctx.rank)
        graphs.clear()
        for _ in range(2):
            x = torch.randn(2 + ctx.rank, C, 5, 5, generator=g).to(ctx.device)
            xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
            out_e, out_c = eager(xe), compiled(xc)
            grad = torch.randn(out_e.shape, generator=g).to(ctx.device)
            out_e.backward(grad)
            out_c.backward(grad)
            torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-5, atol=1e-6)
            for (name, pe), pc in zip(eager.named_parameters(), compiled_net.parameters(), strict=True):
                torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-5, atol=1e-6, msg=name)
                pe.grad = pc.grad = None
            for (name, be), bc in zip(eager.named_buffers(), compiled_net.buffers(), strict=True):
                torch.testing.assert_close(bc, be, rtol=1e-6, atol=1e-7, msg=name)
        assert len(graphs) == 2, f"{len(graphs)} graphs: a graph break or a recompilation"
        forward, backward = graphs
        assert forward.count("_c10d_functional.all_gather_into_tensor") == 2, forward
        assert backward.count("_c10d_functional.all_reduce") == 2, backward
        assert "bn_apply" in forward and "bn_dual_apply" in forward, forward
        assert "bn_backward_apply" in backward and "batch_norm" not in forward + backward


@check(3)
def subgroup(ctx: Ctx):
    """process_group: ranks 0 and 2 synchronize over their own group; rank 1, alone in its
    group, runs exactly the single-device op with no collective."""
    pair = dist.new_group([0, 2])  # every rank creates every group, in the same order
    alone = [dist.new_group([r]) for r in range(ctx.world)]
    if ctx.rank in (0, 2):
        in_pair = dataclasses.replace(ctx, rank=dist.get_rank(pair), world=2)
        sync_single(in_pair, "subgroup", [2, 3], group=pair, layout="channels_last")
        sync_dual(in_pair, "subgroup dual", [1, 2], group=pair)
        return
    prob = problem([2], (C, 4, 5), torch.float32, ctx.device)
    leaves, stats, grad = prob.slice(0)
    got = run(single_fn(fused_residual.sync_bn_add_relu, process_group=alone[1], backend=ctx.backend),
              leaves, stats, grad)
    want = run(single_fn(fused_residual.bn_add_relu, backend=ctx.backend), leaves, stats, grad)
    assert (got.forward_calls, got.backward_calls) == ([], [])
    assert torch.equal(got.out, want.out)
    for key, value in got.grads.items():
        assert torch.equal(value, want.grads[key]), key


if "triton" in fused_residual.available_backends("cpu"):  # the interpreter (TRITON_INTERPRET=1)
    @check(2)
    def triton_backend(ctx: Ctx):
        sync_single(ctx, "triton", [2, 1], backend="triton")
        sync_dual(ctx, "triton dual", [0, 2], backend="triton", layout="channels_last")


@check()  # run on its own by tests/test_sync.py::test_empty_rank_does_not_deadlock
def empty_rank_steps(ctx: Ctx):
    """Training steps (module, dual, no_grad) and an eval step where rank 1 has no rows."""
    n = 0 if ctx.rank == 1 else 2
    g = torch.Generator().manual_seed(ctx.rank)
    bn = init_affine(fused_residual.SyncBatchNormAddReLU2d(C, backend=ctx.backend)).to(ctx.device)
    bn2 = init_affine(fused_residual.SyncBatchNormAddReLU2d(C, backend=ctx.backend), 1).to(ctx.device)
    for _ in range(3):
        x, r = (torch.randn(n, C, 4, 4, generator=g).to(ctx.device).requires_grad_() for _ in range(2))
        bn(x, r).sum().backward()
        a, a2 = norm_call_args(batch_norm_state(bn)), norm_call_args(batch_norm_state(bn2))
        fused_residual.sync_dual_bn_add_relu(x, a.running_mean, a.running_var, a.weight, a.bias, r,
                                             a2.running_mean, a2.running_var, a2.weight, a2.bias, True,
                                             backend=ctx.backend).sum().backward()
        with torch.no_grad():
            bn(x, r)
    bn.eval()
    bn(x, r)
    stats = torch.cat([bn.running_mean, bn.running_var, bn2.running_mean, bn2.running_var])
    everywhere = [torch.empty_like(stats) for _ in range(ctx.world)]
    dist.all_gather(everywhere, stats)
    assert torch.isfinite(stats).all() and all(torch.equal(s, stats) for s in everywhere)


@check(2, devices=("cuda",))
def against_torch_sync_batchnorm(ctx: Ctx):
    """On GPUs (NCCL): SyncBatchNormAddReLU2d and nn.SyncBatchNorm + add + ReLU on the same
    per-rank batches, each against nn.BatchNorm2d in float64 on the whole batch under the
    derived bound (torch's own in float32 only: in bfloat16 it rounds intermediates)."""
    sizes = [3, 2]
    for dtype in (torch.float32, torch.bfloat16):
        prob = problem(sizes, (C, 4, 5), dtype, ctx.device, layout="channels_last", seed=5)
        leaves, _, grad = prob.slice(ctx.rank)
        ours = init_affine(fused_residual.SyncBatchNormAddReLU2d(C, backend=ctx.backend)).to(ctx.device)
        theirs = nn.SyncBatchNorm(C).to(ctx.device)
        eager, truth = nn.BatchNorm2d(C).to(ctx.device), nn.BatchNorm2d(C).to(ctx.device).double()
        for m in (theirs, eager, truth):
            m.load_state_dict(ours.state_dict())
        candidates = [("SyncBatchNormAddReLU2d", ours, ours)]
        if dtype == torch.float32:
            candidates.append(("nn.SyncBatchNorm + add + ReLU", eager_tail(theirs), theirs))
        for name, call, bn in candidates:
            whole = module_whole_batch(bn, eager, truth, prob)
            got = module_run(call, bn, leaves["input"], leaves["residual"], grad, count=False)
            compare_with_whole_batch(f"{name} {dtype}", got, whole, sizes, ctx.rank)


@check(2)
def compile_inductor(ctx: Ctx):
    """The default torch.compile backend (Inductor) lowers the functional collectives and the
    fused ops of a synchronized training step with no graph break (fullgraph=True), and two
    steps match eager."""
    torch.manual_seed(0)
    eager = init_affine(fused_residual.SyncBatchNormAddReLU2d(C, backend=ctx.backend)).to(ctx.device)
    compiled_bn = copy.deepcopy(eager)
    compiled = torch.compile(compiled_bn, fullgraph=True, dynamic=False)
    g = torch.Generator().manual_seed(ctx.rank)
    for _ in range(2):
        x, r, grad = (torch.randn(2 + ctx.rank, C, 5, 5, generator=g).to(ctx.device) for _ in range(3))
        got = module_run(compiled, compiled_bn, x, r, grad, count=False)
        want = module_run(eager, eager, x, r, grad)
        torch.testing.assert_close(got.out, want.out, rtol=1e-5, atol=1e-6)
        for key, value in got.grads.items():
            torch.testing.assert_close(value, want.grads[key], rtol=1e-5, atol=1e-6, msg=key)
        for a, b in zip(got.stats, want.stats, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
