"""A converted model saved as a program (issue 23, items 3 and 4):

- torch.export keeps the fused ops: the program loads, in a fresh process, once
  fused_residual is imported (and not before);
- `fused_residual.export_unfused` gives a program in aten ops that loads and runs in a fresh
  process where fused_residual cannot be imported, in eval and in training mode, also for a
  model that calls the fused ops directly;
- the ops' aten decompositions compute what the ops compute, and registering them (for the
  ONNX exporter) leaves torch.compile with dynamic shapes running the fused ops;
- torch.jit.trace of a converted model passes its own check, saves and loads without
  fused_residual; torch.jit.script refuses at once, naming the module and the alternatives.
"""

from __future__ import annotations

import copy

import pytest
import torch
from bounds import primitive_bounds
from deploy_checks import DirectOps, converted, fused_targets, run_python
from helpers import DEVICE, FUSED_BACKENDS, assert_model_output_within_rule, assert_within_bound

import fused_residual
from fused_residual.decompositions import decompositions

pytest.importorskip("torchvision")


def _save_io(tmp_path, **tensors):
    path = tmp_path / "io.pt"
    torch.save({k: v.detach().cpu() for k, v in tensors.items()}, path)
    return path


def test_fused_program_needs_the_import(tmp_path):
    """torch.export.export keeps the fused ops; the saved program loads once fused_residual is
    imported, and says which op it misses before."""
    model, _, _ = converted("resnet18")
    model.eval()
    x = torch.randn(2, 3, 64, 64, device=DEVICE)
    program = torch.export.export(model, (x,))
    assert {"fused_residual.bn_apply.default", "fused_residual.bn_dual_apply.default"} <= fused_targets(
        program.graph)
    torch.export.save(program, tmp_path / "fused.pt2")
    with torch.no_grad():
        io = _save_io(tmp_path, x=x, want=model(x))
    out = run_python(f"""
import torch
try:
    torch.export.load("fused.pt2")
except Exception:  # torch logs the reason (the op it cannot resolve) to stderr
    print("refused before the import")
else:
    raise AssertionError("the fused program loaded without fused_residual")
import fused_residual
io = torch.load({str(io)!r})
out = torch.export.load("fused.pt2").module()(io["x"])
torch.testing.assert_close(out, io["want"])
print("loaded after the import")
""", tmp_path, without_fused_residual=False)
    assert "refused before the import" in out and "loaded after the import" in out, out
    assert "failed to resolve torch.ops.fused_residual" in out, out


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_unfused_program_loads_without_the_library(tmp_path, training):
    """export_unfused: no fused op in the graph; the saved program loads and runs in a process
    where fused_residual cannot be imported, giving its in-process output (and, in training,
    its running statistics); that output is the converted model's under the whole-model rule
    (tests/helpers.py)."""
    model, original, truth = converted("resnet18")
    for m in (model, original, truth):
        m.train(training)
    x = torch.randn(4, 3, 64, 64, device=DEVICE)
    program = fused_residual.export_unfused(model, (x,))
    assert not fused_targets(program.graph)
    torch.export.save(program, tmp_path / "unfused.pt2")
    module = program.module()
    with torch.no_grad():
        got = module(x)
        want, exact = original(x), truth(x.double())
    assert_model_output_within_rule("unfused program", got, want, exact)
    state = {k.replace(".", "/"): v for k, v in module.state_dict().items() if "running" in k}
    io = _save_io(tmp_path, x=x, got=got, **state)
    run_python(f"""
import torch
io = torch.load({str(io)!r})
module = torch.export.load("unfused.pt2").module()
with torch.no_grad():
    out = module(io["x"])
torch.testing.assert_close(out, io["got"], rtol=0, atol=0)
state = module.state_dict()
for key, value in io.items():
    if "running" in key:
        torch.testing.assert_close(state[key.replace("/", ".")], value, rtol=0, atol=0, msg=key)
""", tmp_path, without_fused_residual=True)


def test_unfused_program_of_direct_op_calls(tmp_path):
    """A forward that calls the extension's ops itself (as a data-flow rewritten forward may):
    export_unfused decomposes them; the program loads without fused_residual."""
    model = DirectOps(8)
    x, r = torch.randn(2, 8, 6, 6, device=DEVICE), torch.randn(2, 8, 6, 6, device=DEVICE)
    assert fused_targets(torch.export.export(model, (x, r)).graph)
    program = fused_residual.export_unfused(model, (x, r))
    assert not fused_targets(program.graph)
    torch.export.save(program, tmp_path / "direct.pt2")
    got = program.module()(x, r)
    with torch.no_grad():
        want, bound = model.unfused(x, r), model.output_bound(x, r)
        exact = copy.deepcopy(model).double().unfused(x.double(), r.double())
    assert_within_bound("unfused program", got, exact, bound, want, True)
    io = _save_io(tmp_path, x=x, r=r, got=got)
    run_python(f"""
import torch
io = torch.load({str(io)!r})
out = torch.export.load("direct.pt2").module()(io["x"], io["r"])
torch.testing.assert_close(out, io["got"], rtol=0, atol=0)
""", tmp_path, without_fused_residual=True)


# --------------------------------------------------------------------------------------
# The decompositions themselves
# --------------------------------------------------------------------------------------


def _op_inputs(dtype, layout):
    g = torch.Generator().manual_seed(3)
    shape = (3, 5, 4, 6)
    x, r, x2 = (torch.randn(shape, generator=g).to(DEVICE, dtype) for _ in range(3))
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    c = shape[1]
    per_channel = [(torch.rand(c, generator=g) + 0.5).to(DEVICE, acc) for _ in range(8)]
    return x, r, x2, per_channel


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_decompositions_compute_the_ops(backend, dtype, layout):
    """Each op's decomposition beside the op: both within the op's derived bound of the
    float64 truth (tests/bounds.py), the same output layout, and a mask that is its own
    output's > 0."""
    from fused_residual.backends import backend_ops
    from fused_residual.reference import pack_mask, working_layout

    ops = backend_ops(backend)
    table = decompositions()
    x, r, x2, (m, v, w, b, m2, v2, w2, b2) = _op_inputs(dtype, layout)
    calls = {
        "apply": (x, r, m, v, w, b, 1e-5, True),
        "dual_apply": (x, m, v, w, b, x2, m2, v2, w2, b2, 1e-5, 1e-3, True),
        "stats": (x,),
    }
    for name, args in calls.items():
        op = getattr(ops, name)
        got, want = table[op](*args), op(*args)
        exact = table[op](*(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                            for a in args))
        bounds = primitive_bounds(name, args)
        for i, (g_, w_, e_, bound) in enumerate(zip(got, want, exact, bounds, strict=True)):
            if g_.dtype == torch.uint8:  # the mask: own output > 0, in the working layout
                assert torch.equal(g_, pack_mask(got[0] > 0, working_layout(x))), name
                continue
            assert g_.dtype == w_.dtype and g_.stride() == w_.stride(), (name, i)
            # Both the decomposition and the op are implementations of the op: both in the bound.
            assert_within_bound(f"{name} output {i}: decomposition", g_, e_, bound)
            assert_within_bound(f"{name} output {i}: {backend} op", w_, e_, bound)


def test_dynamic_shapes_compile_still_runs_the_fused_ops():
    """The decompositions are in torch's global table, which fake tensors consult under
    symbolic shapes: torch.compile(dynamic=True) of a training step still calls the fused ops,
    and gives what eager gives."""
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    torch._dynamo.reset()
    bn = fused_residual.BatchNormAddReLU2d(6, device=DEVICE)
    compiled = torch.compile(bn, backend=aot_autograd(fw_compiler=capture, bw_compiler=capture),
                             dynamic=True, fullgraph=True)
    for n in (2, 3):
        x = torch.randn(n, 6, 5, 5, device=DEVICE, requires_grad=True)
        r = torch.randn_like(x)
        out = compiled(x, r)
        out.sum().backward()
        grad = x.grad.clone()
        x.grad = None
        eager = fused_residual.BatchNormAddReLU2d(6, device=DEVICE)
        eager.load_state_dict(bn.state_dict())  # (its running stats already moved: outputs only)
        want = eager(x, r)
        want.sum().backward()
        torch.testing.assert_close(out, want)
        torch.testing.assert_close(grad, x.grad)
    code = "\n".join(graphs)
    assert "fused_residual.bn_apply" in code and "fused_residual.bn_backward_apply" in code, code
    assert "batch_norm" not in code


# --------------------------------------------------------------------------------------
# TorchScript
# --------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("error::torch.jit.TracerWarning")
def test_jit_trace_saves_and_loads_without_the_library(tmp_path):
    """torch.jit.trace with its default check (which failed with "Graphs differed across
    invocations" when one trace recorded the autograd.Function and the other the op): the
    trace is the unfused composition, under the rule against the original, and runs where
    fused_residual cannot be imported."""
    model, original, truth = converted("resnet18")
    for m in (model, original, truth):
        m.eval()
    x = torch.randn(2, 3, 64, 64, device=DEVICE)
    traced = torch.jit.trace(model, (x,))
    kinds = {node.kind() for node in traced.inlined_graph.nodes()}
    assert "aten::batch_norm" in kinds, kinds
    assert not [k for k in kinds if k.startswith("fused_residual::") or k == "prim::PythonOp"], kinds
    with torch.no_grad():
        got, want, exact = traced(x), original(x), truth(x.double())
    assert_model_output_within_rule("traced", got, want, exact)
    torch.jit.save(traced, tmp_path / "traced.pt")
    io = _save_io(tmp_path, x=x, got=got)
    run_python(f"""
import torch
io = torch.load({str(io)!r})
out = torch.jit.load("traced.pt")(io["x"])
torch.testing.assert_close(out, io["got"], rtol=0, atol=0)
""", tmp_path, without_fused_residual=True)


def test_jit_script_refuses_at_once_naming_the_module():
    for model in (converted("resnet18")[0], fused_residual.BatchNormAddReLU2d(4)):
        with pytest.raises(RuntimeError, match=r"jit.script cannot compile BatchNormAddReLU2d\(") as info:
            torch.jit.script(model)
        message = str(info.value)
        for alternative in ("torch.jit.trace", "torch.export.export", "export_unfused", "unconvert"):
            assert alternative in message, message
