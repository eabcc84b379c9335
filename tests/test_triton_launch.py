"""The Triton ops' launches: every kernel runs under a device guard for the tensors' device
(a tensor on cuda:1 is never touched by a launch on cuda:0's stream), and every op's outputs
are tensors of their own. Ahead-of-time compilation for sm_90: tests/test_gpu_static.py."""

from __future__ import annotations

import pytest
import torch
from test_triton_backend import DEVICE, EPS, make, ops, per_channel, pytestmark, random_mask  # noqa: F401


def _all_ops_once(x):
    """Every op once on `x` (training chain, eval backward, dual, no-mask and partial-gradient
    variants), in rows mode or flat mode depending on x's shape."""
    c = x.shape[1]
    count = x.shape[0] * x.shape[2] * x.shape[3]
    w = per_channel(c, seed=1).to(x.device)
    mean, var = ops().triton_bn_stats(x)
    rm, rv = per_channel(c, seed=2).to(x.device), per_channel(c, seed=3, positive=True).to(x.device)
    ops().triton_bn_update_running_stats(mean, var, count, rm, rv, 0.1)
    out, mask = ops().triton_bn_apply(x, x, mean, var, w, None, EPS, True)
    ops().triton_bn_apply(x, None, rm, rv, None, w, EPS, False)
    ops().triton_bn_dual_apply(x, mean, var, w, None, x, rm, rv, None, w, EPS, EPS, True)
    sdy, sdyx, _ = ops().triton_bn_backward_reduce(out, mask, x, mean, var, EPS)
    ops().triton_bn_backward_apply(out, mask, x, mean, var, w, sdy, sdyx, EPS, count, True, True)
    ops().triton_bn_backward_apply(out, mask, x, rm, rv, None, None, None, EPS, count, True, False)
    ops().triton_bn_backward_apply(out, mask, x, mean, var, w, sdy, sdyx, EPS, count, False, True)


class _RecordingGuard:
    """A stand-in for `torch.cuda`: `device(d)` is a context that records entering and
    leaving; the interpreter's launches record themselves in the same list."""

    def __init__(self, events):
        self.events = events

    def device(self, device):
        events = self.events

        class Guard:
            def __enter__(self):
                events.append(("enter", torch.device(device)))

            def __exit__(self, *exc):
                events.append(("exit", torch.device(device)))

        return Guard()


@pytest.mark.skipif(DEVICE != "cpu", reason="the stand-in guard replaces the CUDA one under the interpreter")
@pytest.mark.parametrize("shape, mode", [((2, 8, 4, 4), "rows"), ((2, 3, 5, 7), "flat")])
def test_every_launch_runs_under_a_guard_for_the_inputs_device(monkeypatch, shape, mode):
    """Triton launches on the current device's stream: every op must make the tensors'
    device current around each launch (the C++ ops' CUDAGuard), or a tensor on cuda:1 would
    be read by a kernel launched on cuda:0. A recording stand-in for `torch.cuda` checks
    that each kernel launch happens inside a guard entered for the input's device."""
    from fused_residual.triton import _launch

    events = []
    monkeypatch.setitem(_launch.GUARDED_DEVICE_TYPES, "cpu", _RecordingGuard(events))
    real_getitem = _launch._InterpretedLaunch.__getitem__

    def recording_getitem(self, grid):
        launch = real_getitem(self, grid)

        def run(*args, **kwargs):
            events.append(("launch", self.kernel.fn.__name__))
            return launch(*args, **kwargs)

        return run

    monkeypatch.setattr(_launch._InterpretedLaunch, "__getitem__", recording_getitem)
    x = make(shape, torch.float32)
    _all_ops_once(x)
    launches = [e for e in events if e[0] == "launch"]
    assert len(launches) >= 11, events
    kernels = {name for _, name in launches}
    assert {f"_apply_{mode}_kernel", f"_backward_apply_{mode}_kernel"} <= kernels, kernels
    depth = 0
    for kind, what in events:
        if kind == "enter":
            assert what == x.device, events
            depth += 1
        elif kind == "exit":
            depth -= 1
        else:
            assert depth > 0, f"{what} launched outside a device guard: {events}"
    assert depth == 0


def test_cuda_tensors_are_guarded_with_torch_cuda_device():
    from fused_residual.triton import _launch

    assert _launch.GUARDED_DEVICE_TYPES["cuda"] is torch.cuda
    guard = _launch.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert _launch.device_guard(torch.device("cpu")).__class__.__name__ == "nullcontext"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_ops_on_a_second_device_match_the_first():
    """Tensors on cuda:1 while cuda:0 is current: the same results as on cuda:0, bit for bit
    (same kernels, same plan: both devices are of one kind here), and cuda:0 stays current."""
    assert torch.cuda.get_device_name(0) == torch.cuda.get_device_name(1), "needs two devices of one kind"
    torch.cuda.set_device(0)
    results = {}
    for dev in ("cuda:0", "cuda:1"):
        for shape, layout in (((4, 64, 14, 14), "nchw"), ((4, 64, 8, 8), "nhwc")):
            x = make(shape, torch.bfloat16, layout).to(dev)
            c = shape[1]
            w, b = per_channel(c, seed=1).to(dev), per_channel(c, seed=2).to(dev)
            mean, var = ops().triton_bn_stats(x)
            out, mask = ops().triton_bn_apply(x, x, mean, var, w, b, EPS, True)
            sums = ops().triton_bn_backward_reduce(out, mask, x, mean, var, EPS)
            grads = ops().triton_bn_backward_apply(out, mask, x, mean, var, w, sums[0], sums[1], EPS,
                                                   shape[0] * shape[2] * shape[3], True, True)
            torch.cuda.synchronize(dev)
            results[(dev, shape)] = [t.cpu() for t in (mean, var, out, mask, *sums, *grads)]
            assert torch.cuda.current_device() == 0
    for (dev, shape), got in results.items():
        for a, b in zip(got, results[("cuda:0", shape)], strict=True):
            assert torch.equal(a, b), (dev, shape)


def test_no_output_aliases_another_or_an_input():
    """Every op's outputs are tensors of their own (no view of another output or of an
    input; an output that is not computed is an empty tensor of its own), so functionalization
    can never hand a kernel an unwritten clone."""
    x = make((2, 3, 5, 7), torch.float32)
    m, v, w = per_channel(3), per_channel(3, positive=True), per_channel(3, seed=1)
    mask = random_mask(x)
    backward_apply = ops().triton_bn_backward_apply
    calls = {
        "stats": ops().triton_bn_stats(x),
        "apply": ops().triton_bn_apply(x, x, m, v, w, None, EPS, False),
        "dual_apply": ops().triton_bn_dual_apply(x, m, v, w, None, x, m, v, None, w, EPS, EPS, False),
        "backward_reduce": ops().triton_bn_backward_reduce(x, mask, x, m, v, EPS),
        "backward_apply gi": backward_apply(x, mask, x, m, v, w, m, v, EPS, 40, True, False),
        "backward_apply gr": backward_apply(x, mask, x, m, v, w, m, v, EPS, 40, False, True),
        "backward_apply none": backward_apply(x, mask, x, m, v, w, m, v, EPS, 40, False, False),
    }
    inputs = (x, m, v, w, mask)
    for name, outs in calls.items():
        for i, a in enumerate(outs):
            assert a._base is None, f"{name}[{i}] is a view"
            others = [t for j, t in enumerate(outs) if j != i] + list(inputs)
            assert all(a.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
                       for t in others if t.numel() and a.numel()), f"{name}[{i}] shares storage"
            assert all(a is not t for t in others), f"{name}[{i}] is another argument or output"
