"""torch.compile(fullgraph=True) traces the fused ops forward and backward with no graph break."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import DEVICE, FUSED_BACKENDS, INTERPRETED

import fused_residual
from fused_residual import backends

# Under Triton's interpreter, tracing a triton_op with fake tensors touches data pointers and
# fails; the Triton backend is compiled on GPUs only.
COMPILABLE = [b for b in FUSED_BACKENDS if not (b == "triton" and INTERPRETED)]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", COMPILABLE)
# Training (the one with the running-stat update and the full backward) is in the GPU smoke run.
@pytest.mark.parametrize("training", [pytest.param(True, marks=pytest.mark.smoke), False],
                         ids=["train", "eval"])
def test_compiled_block_forward_backward(backend, training):
    torch.manual_seed(0)
    eager = fused_residual.FusedResidualBlock(4, 8, backend=backend).to(DEVICE).train(training)
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True, dynamic=False)
    x = torch.randn(2, 4, 6, 6, device=DEVICE)
    grad = torch.randn(2, 8, 6, 6, device=DEVICE)
    for _ in range(2):
        xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        out_e, out_c = eager(xe), compiled(xc)
        out_e.backward(grad)
        out_c.backward(grad)
        torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-4, atol=1e-5)
        for (name, pe), (_, pc) in zip(eager.named_parameters(), compiled_module.named_parameters(),
                                       strict=True):
            torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-4, atol=1e-5, msg=name)
        for (name, be), (_, bc) in zip(eager.named_buffers(), compiled_module.named_buffers(),
                                       strict=True):
            torch.testing.assert_close(bc, be, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend", COMPILABLE)
def test_compiled_graphs_hold_the_fused_ops(backend):
    """AOT forward graph: stats, running-stat update, apply; backward: reduce, apply; no batch_norm."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs: list[str] = []

    def record(gm, example_inputs):
        graphs.append(gm.code)
        return make_boxed_func(gm.forward)

    bn = fused_residual.BatchNormAddReLU2d(4, backend=backend).to(DEVICE)
    fn = torch.compile(bn, backend=aot_autograd(fw_compiler=record, bw_compiler=record), fullgraph=True)
    x = torch.randn(2, 4, 3, 3, device=DEVICE, requires_grad=True)
    fn(x, torch.randn_like(x)).sum().backward()
    assert len(graphs) == 2, graphs
    forward, backward = graphs
    prefix = f"fused_residual.{backends._OP_PREFIX[backend]}bn_"
    for op in ("stats", "update_running_stats", "apply"):
        assert f"{prefix}{op}" in forward, forward
    for op in ("backward_reduce", "backward_apply"):
        assert f"{prefix}{op}" in backward, backward
    assert "batch_norm" not in forward + backward
