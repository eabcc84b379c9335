"""Host overhead per call (issue 21): the fused op against eager PyTorch on tensors so small
that the kernels do next to nothing, (2, 4, 2, 2) float32, one intra-op thread. What is timed
is everything a call costs the host: Python argument checks, backend resolution, the
autograd.Function, the custom-op dispatch, output allocation (and for training the backward
through the autograd engine). On a GPU, small-batch steps are bound by exactly this.

- eval_fwd: `bn_add_relu(..., training=False)` under no_grad vs `relu(batch_norm(x) + r)`.
- train_fwdbwd: a training forward and `.backward()` into the leaves (input, residual,
  weight, bias), as a training step runs it, vs the same through eager's autograd.
Both for the functional op and for the module (`BatchNormAddReLU2d(x, r)` vs an
nn.BatchNorm2d, the add and the ReLU: what a converted model calls).

Each round is `CALLS_PER_ROUND` calls (pytest-benchmark's iterations), so a round lasts well
above the timer's resolution and the table reads in µs per call. The acceptance line is
fused <= 1.1x eager per call ("vs eager" >= 0.91x); scripts/bench_report.py prints it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from bench_common import DEVICE, record, time_case

import fused_residual
from fused_residual.bench_utils import synchronize

SHAPE = (2, 4, 2, 2)
CALLS_PER_ROUND = 100
FUSED = [b for b in fused_residual.available_backends(DEVICE) if b != "reference"
         and not (b == "triton" and DEVICE == "cpu")]


def overhead_case(api: str, mode: str) -> str:
    shape = "x".join(map(str, SHAPE))
    return f"overhead {api} {shape} float32 {mode} (µs per call, 1 thread)"


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _call(api: str, provider: str, mode: str):
    """A no-argument callable running one call of `mode` for `provider`: the functional op
    (`bn_add_relu` vs relu(F.batch_norm + r)) or the module (`BatchNormAddReLU2d` vs an
    nn.BatchNorm2d, the add and the ReLU)."""
    g = torch.Generator().manual_seed(0)
    c = SHAPE[1]

    def new(*shape, grad=False):
        return torch.randn(*shape, generator=g).to(DEVICE).requires_grad_(grad)

    train = mode == "train_fwdbwd"
    x, r = new(*SHAPE, grad=train), new(*SHAPE, grad=train)
    w, b = new(c, grad=train), new(c, grad=train)
    rm, rv = torch.zeros(c, device=DEVICE), torch.ones(c, device=DEVICE)
    grad = new(*SHAPE)
    if api == "BatchNormAddReLU2d":
        norm = (torch.nn.BatchNorm2d(c) if provider == "eager"
                else fused_residual.BatchNormAddReLU2d(c, backend=provider)).to(DEVICE).train(train)
        if provider == "eager":
            def forward():
                return F.relu(norm(x) + r)
        else:
            def forward():
                return norm(x, r)
    elif provider == "eager":
        def forward():
            return F.relu(F.batch_norm(x, rm, rv, w, b, train, 0.1, 1e-5) + r)
    else:
        def forward():
            return fused_residual.bn_add_relu(x, r, rm, rv, w, b, train, backend=provider)
    if train:
        def run():
            forward().backward(grad)
    else:
        def run():
            with torch.no_grad():
                forward()
    return run


@pytest.mark.parametrize("provider", ["eager", *FUSED])
@pytest.mark.parametrize("mode", ["eval_fwd", "train_fwdbwd"])
@pytest.mark.parametrize("api", ["bn_add_relu", "BatchNormAddReLU2d"])
def test_overhead(benchmark, one_thread, api, mode, provider):
    run = _call(api, provider, mode)
    case = overhead_case(api, mode)
    benchmark.group = case
    # No device synchronisation per call: the host's time is what is measured (on a GPU the
    # tiny kernels finish long before the host has issued the next call's).
    extra = time_case(benchmark, run, iterations=CALLS_PER_ROUND)
    synchronize(DEVICE)
    extra["calls_per_round"] = CALLS_PER_ROUND
    record(case, provider, benchmark, extra)
