"""ONNX export of converted models (issue 23, item 2): `torch.onnx.export` alone, with the
dynamo exporter (the default) and the legacy TorchScript-based one, gives a graph of standard
ONNX ops (no custom domain, no fused_residual op) that onnxruntime runs, and its output is the
original model's: a whole network's logits under the rule over many values (float64 truth,
PyTorch's own float32 error, tests/helpers.py); a forward of the ops alone under their
derived bound (tests/bounds.py).

Both routes are covered: the functional layer computing the unfused composition while ONNX
export runs, and (the switch turned off) the fused ops' aten decompositions, which are what a
forward calling the ops directly relies on.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from deploy_checks import DirectOps, converted
from helpers import DEVICE, FUSED_BACKENDS, assert_model_output_within_rule, assert_within_bound

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("torchvision")

if DEVICE != "cpu":
    pytest.skip("ONNX export runs the model on CPU tensors here", allow_module_level=True)


def export(model, args, dynamo: bool) -> onnx.ModelProto:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer notes
        if dynamo:
            return torch.onnx.export(model, args, dynamo=True, verbose=False).model_proto
        buffer = io.BytesIO()
        torch.onnx.export(model, args, buffer, dynamo=False)
    return onnx.load_from_string(buffer.getvalue())


def standard_ops(proto: onnx.ModelProto) -> set[str]:
    """The graph's op types, checked to be the standard domain's (functions included)."""
    onnx.checker.check_model(proto)
    nodes = list(proto.graph.node) + [n for f in proto.functions for n in f.node]
    custom = {(n.domain, n.op_type) for n in nodes if n.domain not in ("", "ai.onnx")}
    assert not custom, f"custom-domain ops: {custom}"
    assert not [f for f in proto.functions if f.domain not in ("", "ai.onnx")]
    types = {n.op_type for n in nodes}
    assert not [t for t in types if "bn_" in t or "fused" in t.lower()], types
    return types


def run_onnxruntime(proto: onnx.ModelProto, *inputs: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    feeds = {n: t.detach().contiguous().numpy() for n, t in zip(names, inputs, strict=True)}
    return torch.from_numpy(session.run(None, feeds)[0])


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
def test_converted_resnet18(dynamo, layout):
    model, original, truth = converted("resnet18")
    for m in (model, original, truth):
        m.eval()
    x = torch.randn(2, 3, 64, 64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    proto = export(model, (x,), dynamo)
    types = standard_ops(proto)
    assert {"Conv", "Relu", "Add"} <= types, types
    with torch.no_grad():
        want, exact = original(x), truth(x.double())
    assert_model_output_within_rule("onnxruntime output", run_onnxruntime(proto, x), want, exact)


def test_converted_resnet50_dynamo():
    """ResNet-50 once (its bottleneck and downsampling tails), with the default exporter."""
    model, original, truth = converted("resnet50")
    for m in (model, original, truth):
        m.eval()
    x = torch.randn(2, 3, 64, 64)
    proto = export(model, (x,), dynamo=True)
    standard_ops(proto)
    with torch.no_grad():
        want, exact = original(x), truth(x.double())
    assert_model_output_within_rule("onnxruntime output", run_onnxruntime(proto, x), want, exact)


def test_converted_resnet18_through_the_decompositions(monkeypatch):
    """With the functional switch off, the graph holds the fused ops and the dynamo exporter
    decomposes them itself (torch._decomp's table): standard ops, the same output."""
    from fused_residual import functional

    monkeypatch.setattr(functional, "exporting_unfused", lambda: False)
    model, original, truth = converted("resnet18")
    for m in (model, original, truth):
        m.eval()
    x = torch.randn(2, 3, 64, 64)
    assert "fused_residual.bn_dual_apply" in torch.export.export(model, (x,)).graph_module.code
    proto = export(model, (x,), dynamo=True)
    standard_ops(proto)
    with torch.no_grad():
        want, exact = original(x), truth(x.double())
    assert_model_output_within_rule("onnxruntime output", run_onnxruntime(proto, x), want, exact)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_direct_op_calls(backend):
    """A forward calling a backend's ops itself exports with the dynamo exporter, to
    BatchNormalization (or what the optimizer folds it into), Add and Relu."""
    model = DirectOps(8, prefix="triton_" if backend == "triton" else "")
    x, r = torch.randn(2, 8, 6, 6), torch.randn(2, 8, 6, 6)
    proto = export(model, (x, r), dynamo=True)
    types = standard_ops(proto)
    assert {"BatchNormalization", "Add", "Relu"} <= types, types
    with torch.no_grad():
        want, bound = model.unfused(x, r), model.output_bound(x, r)
        exact = model.double().unfused(x.double(), r.double())
    assert_within_bound("onnxruntime output", run_onnxruntime(proto, x, r), exact, bound, want, True)
