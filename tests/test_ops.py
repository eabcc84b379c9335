"""Every op of every fused backend (the primitives and the two composites):
torch.library.opcheck, and the numerics contract of docs/op_layer.md op by op against the
pure-PyTorch primitives of fused_residual.reference: (a) within the bound derived from the
computation (tests/bounds.py) of the reference primitive in float64 on the same inputs, (b)
the packed mask is the backend's own output's signs, (c) bitwise reproducible. A composite op
(bn_train_forward, bn_backward) is held to its backend's primitives composed, bit for bit.
Every case draws its data from its own seeded generators."""

from __future__ import annotations

import pytest
import torch
from bounds import primitive_bounds
from helpers import (
    FUSED_BACKENDS,
    INTERPRETED,
    assert_within_bound,
    eager_computes_as_bounded,
    make_case,
    store_truncates,
)

from fused_residual import reference as R
from fused_residual.backends import backend_ops

# opcheck's fake-tensor and AOT tests trace the op: a triton_op under the interpreter cannot
# be traced (it reads data pointers), so there only the schema test runs.
FULL_OPCHECK = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def opcheck_utils(backend):
    return ("test_schema",) if backend == "triton" and INTERPRETED else FULL_OPCHECK


def seeded_randn_like(t, seed):
    """torch.randn_like(t) (t's dtype, device and memory format) from a generator of its own."""
    g = torch.Generator().manual_seed(seed)
    return torch.empty_like(t).copy_(torch.randn(t.shape, generator=g))


def op_samples(dtype, layout, training):
    """(op name, args) for each op on one case, chained as the autograd composition does."""
    x, r, w, b, rm, rv = make_case((2, 3, 5, 3), dtype, layout)
    mean, var = R.bn_stats_reference(x)
    if not training:
        mean, var = rm, rv
    _, mask = R.bn_apply_reference(x, r, mean, var, w, b, 1e-5, True)
    g = seeded_randn_like(x, 7)
    sum_dy, sum_dy_xmu, _ = R.bn_backward_reduce_reference(g, mask, x, mean, var, 1e-5)
    count = x.shape[0] * x.shape[2] * x.shape[3]
    sums = (sum_dy, sum_dy_xmu) if training else (None, None)
    # bn_dual_apply's second input: other statistics, and another layout than x's.
    x2 = r.contiguous(memory_format=torch.channels_last) if layout == "nchw" else r.contiguous()
    if layout == "strided":
        x2 = r
    mean2, var2 = R.bn_stats_reference(x2) if training else (rm * 2, rv + 0.5)
    w2, b2 = w.flip(0), b * 3
    samples = [
        ("stats", (x,)),
        ("update_running_stats", (mean, var, count, rm.clone(), rv.clone(), 0.1)),
        ("apply", (x, r, mean, var, w, b, 1e-5, True)),
        ("apply", (x, None, mean, var, None, None, 1e-5, False)),
        ("backward_reduce", (g, mask, x, mean, var, 1e-5)),
        ("backward_apply", (g, mask, x, mean, var, w, *sums, 1e-5, count, True, True)),
        ("backward_apply", (g, mask, x, mean, var, None, *sums, 1e-5, count, False, True)),
        ("backward_apply", (g, mask, x, mean, var, w, *sums, 1e-5, count, True, False)),
        ("dual_apply", (x, mean, var, w, b, x2, mean2, var2, w2, b2, 1e-5, 1e-3, True)),
        ("dual_apply", (x, mean, var, None, b, x2, mean2, var2, w2, None, 1e-5, 1e-5, False)),
    ]
    samples += [
        ("backward", (g, mask, x, mean, var, w, 1e-5, training, (True, True, True, True))),
        ("backward", (g, mask, x, mean, var, None, 1e-5, training, (True, False, False, True))),
        ("backward", (g, mask, x, mean, var, w, 1e-5, training, (False, True, False, False))),
    ]
    if training:  # bn_train_forward is the training forward; eval runs bn_apply alone
        samples += [
            ("train_forward", (x, r, rm.clone(), rv.clone(), w, b, 0.1, 1e-5, True)),
            ("train_forward", (x, None, None, None, None, b, 0.1, 1e-5, False)),
        ]
    return samples


LAYOUTS = ["nchw", "channels_last", "strided"]


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(backend, dtype, layout, training):
    ops = backend_ops(backend)
    for name, args in op_samples(dtype, layout, training):
        torch.library.opcheck(getattr(ops, name), args, test_utils=opcheck_utils(backend))


def _clone(args):
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def _to64(args):
    """The arguments in float64 (floating tensors only): the truth's inputs are the op's own
    dtype-rounded inputs."""
    return tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


# Ops that update arguments in place: (op, the slice of its arguments that it mutates).
MUTATED = {"update_running_stats": slice(3, 5), "train_forward": slice(2, 4)}


def results(name, args, outputs):
    """What an op call gives: its outputs, then the arguments it updates in place (running
    statistics; None when absent)."""
    outputs = () if outputs is None else tuple(outputs)
    mutated = MUTATED.get(name)
    return outputs if mutated is None else outputs + tuple(args[mutated])


def check_composite(name, args, got, backend):
    """A composite op computes nothing of its own (docs/op_layer.md): its results are its
    backend's primitives' on the same arguments, composed as fused_residual.reference composes
    them, bit for bit (the primitives themselves are held to the contract by `check_op`)."""
    ops = backend_ops(backend)
    want_args = _clone(args)
    if name == "train_forward":
        want = R.train_forward_steps(ops.stats, ops.update_running_stats, ops.apply, *want_args)
    else:
        want = R.backward_steps(ops.backward_reduce, ops.backward_apply, *want_args)
    want = results(name, want_args, want)
    assert len(got) == len(want), name
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        what = f"{name}[{i}]"
        if w is None:
            assert g is None, what
            continue
        assert (g.shape, g.dtype, g.stride()) == (w.shape, w.dtype, w.stride()), what
        diff = torch.nonzero(g != w)
        assert diff.numel() == 0, f"{what}: differs from the composed primitives at {diff[:8]}"


def check_op(name, args, got, backend="extension"):
    """The numerics contract, op by op: (a) every floating result within the derived bound of
    the reference primitive in float64 on the same inputs (tests/bounds.py; the reference
    primitive in the op's dtypes is held to it too where it computes in float32/float64, and
    reported); (b) an apply op's mask bit set exactly where its own output is > 0 (bit for
    bit, padding bits 0). Two backends may differ at the ReLU kink, so no mask is compared
    with another backend's. `got` is `results`: the outputs, then the arguments updated in
    place. A composite op: `check_composite`."""
    if name in ("train_forward", "backward"):
        return check_composite(name, args, got, backend)
    reference = getattr(R, f"bn_{name}_reference")
    x = args[0] if name != "backward_reduce" and name != "backward_apply" else args[2]
    bounds = primitive_bounds(name, args, store_truncates(backend, x.dtype))
    eager_args, truth_args = _clone(args), _to64(_clone(args))
    # `got`, like these, is `results`: the outputs, then the arguments updated in place.
    eager = results(name, eager_args, reference(*eager_args))
    truth = results(name, truth_args, reference(*truth_args))
    assert isinstance(got, tuple | list) and len(got) == len(truth), name
    for i, (g, e, t) in enumerate(zip(got, eager, truth, strict=True)):
        what = f"{name}[{i}]"
        if t is None:  # a running statistic not given
            assert g is None and e is None, what
            continue
        if t.dtype == torch.uint8:  # the packed mask: (b), against this backend's own output
            out = got[0]
            want = R.pack_mask(out > 0, R.working_layout(x)) if t.numel() else t
            assert g.dtype == torch.uint8 and g.shape == want.shape, (what, g.shape, want.shape)
            diff = torch.nonzero(g != want)
            assert diff.numel() == 0, f"{what}: mask bytes differ from the output's signs at {diff[:8]}"
            continue
        assert g.shape == t.shape and g.dtype == e.dtype, (what, g.shape, t.shape, g.dtype, e.dtype)
        if g.dim() == 4:
            assert g.stride() == e.stride(), f"{what}: layout {g.stride()} != {e.stride()}"
        if g.numel():
            assert_within_bound(what, g, t, bounds[i], e, eager_computes_as_bounded(x.dtype))


# The Triton backend takes float16, bfloat16 and float32; the extension float64 too.
BACKEND_DTYPES = [
    (backend, dtype)
    for backend in FUSED_BACKENDS
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)
    if not (backend == "triton" and dtype == torch.float64)
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES, ids=str)
def test_ops_meet_the_numerics_contract(backend, dtype, layout, training):
    ops = backend_ops(backend)
    for name, args in op_samples(dtype, layout, training):
        got_args = _clone(args)
        got = results(name, got_args, getattr(ops, name)(*got_args))
        check_op(name, args, got, backend)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_ops_are_bitwise_reproducible(backend):
    """(c) of the contract: the same call twice gives the same bits."""
    ops = backend_ops(backend)
    for layout in ("nchw", "channels_last"):
        for name, args in op_samples(torch.float32, layout, True):
            first, again = _clone(args), _clone(args)
            a = results(name, first, getattr(ops, name)(*first))
            b = results(name, again, getattr(ops, name)(*again))
            for i, (t, u) in enumerate(zip(a, b, strict=True)):
                assert (t is None and u is None) or torch.equal(t, u), f"{name}[{i}] ({layout})"


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_misaligned_storage(backend):
    """Tensors that start one element into their storage (no 16-byte alignment) still meet
    the contract."""
    ops = backend_ops(backend)
    for layout in ("nchw", "channels_last"):
        x, r, w, b, _, _ = make_case((2, 8, 3, 5), torch.float32, layout)
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format

        def shifted(t, fmt=fmt):
            storage = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
            view = storage[1:].view(t.permute(0, 2, 3, 1).shape if fmt == torch.channels_last else t.shape)
            if fmt == torch.channels_last:
                view = view.permute(0, 3, 1, 2)
            view.copy_(t)
            return view

        xs, rs = shifted(x), shifted(r)
        assert xs.storage_offset() == 1 and xs.is_contiguous(memory_format=fmt)
        mean, var = ops.stats(xs)
        check_op("stats", (xs,), (mean, var), backend)
        got = ops.apply(xs, rs, mean, var, w, b, 1e-5, True)
        check_op("apply", (xs, rs, mean, var, w, b, 1e-5, True), got, backend)
        g = shifted(seeded_randn_like(x, 11))
        mask = got[1]
        sums = ops.backward_reduce(g, mask, xs, mean, var, 1e-5)
        check_op("backward_reduce", (g, mask, xs, mean, var, 1e-5), sums, backend)
        count = x.shape[0] * x.shape[2] * x.shape[3]
        args = (g, mask, xs, mean, var, w, sums[0], sums[1], 1e-5, count, True, True)
        check_op("backward_apply", args, ops.backward_apply(*args), backend)


@pytest.mark.smoke
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_cuda_graph_capture(backend):
    """A training step (forward, running-stat update, backward) captured and replayed in a
    CUDA graph gives what eager execution gives: no host sync, no data-dependent allocation."""
    import fused_residual

    torch.manual_seed(0)
    bn = fused_residual.BatchNormAddReLU2d(16, backend=backend).cuda()
    x = torch.randn(4, 16, 7, 7, device="cuda", requires_grad=True)
    r = torch.randn(4, 16, 7, 7, device="cuda", requires_grad=True)
    grad = torch.randn(4, 16, 7, 7, device="cuda")
    reference_bn = fused_residual.BatchNormAddReLU2d(16, backend=backend).cuda()
    reference_bn.load_state_dict(bn.state_dict())

    def step(module):
        out = module(x, r)
        gx, gr, gw = torch.autograd.grad(out, (x, r, module.weight), grad)
        return out, gx, gr, gw

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm up (compilation, allocator) outside the capture
            step(bn)
    torch.cuda.current_stream().wait_stream(side)
    for _ in range(2):
        step(reference_bn)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step(bn)
    graph.replay()
    torch.cuda.synchronize()
    expected = step(reference_bn)
    for got, want in zip(captured, expected, strict=True):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(bn.running_mean, reference_bn.running_mean)
    torch.testing.assert_close(bn.running_var, reference_bn.running_var)
