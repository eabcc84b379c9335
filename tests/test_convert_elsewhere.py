"""convert() by data flow (issue 20), a converted model elsewhere: pickled into a fresh
process, traced by torch.fx, exported by torch.export, compiled with fullgraph=True; and the
convert layer's modules import without a cycle. Models and checks:
tests/test_convert_dataflow.py."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import DEVICE

import fused_residual
from fused_residual.seed import ResidualBlock

tv = pytest.importorskip("torchvision")
from model_checks import randomize_norms  # noqa: E402
from test_convert_dataflow import (  # noqa: E402
    BACKEND,
    CifarResNet,
    primary,
    tiny_hf,
    x64,
)

# --------------------------------------------------------------------------------------------
# A converted model elsewhere: a fresh process, torch.fx, torch.export, torch.compile
# --------------------------------------------------------------------------------------------


def test_torch_save_load_in_a_fresh_process(tmp_path):
    """Rewritten forwards are rebuilt from their pickled programs in a process that has not
    converted anything: the same classes, bitwise the same outputs."""
    import subprocess
    import sys

    from torchvision.models.regnet import BlockParams, RegNet

    torch.manual_seed(0)
    params = BlockParams.from_init_params(depth=4, w_0=16, w_a=8.0, w_m=2.0, group_width=8, se_ratio=0.25)
    regnet = RegNet(params)
    models = [fused_residual.convert(randomize_norms(m).eval(), backend=BACKEND)
              for m in (CifarResNet(), regnet, ResidualBlock(3, 8))]
    x = x64(32)
    with torch.no_grad():
        want = [primary(m(x)) for m in models]
    path = tmp_path / "models.pt"
    torch.save({"models": models, "x": x, "want": want, "types": [[type(s).__name__ for s in m.modules()]
                                                                  for m in models]}, path)
    script = (
        "import sys, torch; sys.path.insert(0, sys.argv[2]); from test_convert_dataflow import primary;"
        "d = torch.load(sys.argv[1], weights_only=False);"
        "assert [[type(s).__name__ for s in m.modules()] for m in d['models']] == d['types'];"
        "assert all(torch.equal(primary(m(d['x'])), w) for m, w in zip(d['models'], d['want']));"
        "print('loaded ok')"
    )
    import os

    done = subprocess.run([sys.executable, "-c", script, str(path), os.path.dirname(__file__)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "loaded ok" in done.stdout, done.stdout + done.stderr[-3000:]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fx_trace_and_export(training):
    """torch.fx records one call per fused op through the call sites and the children's
    forwards up to their norm; torch.export keeps the fused ops; both compute what the
    converted model does."""
    transformers = pytest.importorskip("transformers")
    model = fused_residual.convert(tiny_hf(transformers), backend=BACKEND).train(training)
    x = x64(32).to(DEVICE)
    stage = model.resnet.encoder.stages[1]  # (Hugging Face's top-level forward does not trace)
    gm = torch.fx.symbolic_trace(copy.deepcopy(stage))
    targets = " ".join(str(n.target) for n in gm.graph.nodes)
    assert targets.count("fused_norm_forward") == 2 * 2 + 1 and targets.count("fused_dual_forward") == 1
    h = torch.relu(torch.randn(2, 16, 8, 8, device=DEVICE))
    with torch.no_grad():
        assert torch.equal(gm(h), copy.deepcopy(stage)(h))
    exported = torch.export.export(copy.deepcopy(model), (x,))
    assert "fused_residual.bn_dual_apply" in exported.graph_module.code or BACKEND == "reference"
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x).logits, copy.deepcopy(model)(x).logits, rtol=1e-6,
                                   atol=1e-6)


@pytest.mark.skipif(BACKEND == "reference", reason="no compiled fused backend here")
def test_compile_fullgraph():
    """torch.compile(fullgraph=True) traces the call sites, the children's forwards up to
    their norm and the folded ReLUs without a graph break (fullgraph raises), forward and
    backward, with the fused ops in the graphs and the eager converted model's values."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    transformers = pytest.importorskip("transformers")
    model = fused_residual.convert(tiny_hf(transformers), backend=BACKEND).train()
    eager = copy.deepcopy(model)
    graphs: list[str] = []

    def record(gm, example_inputs):
        graphs.append(gm.code)
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    backend = aot_autograd(fw_compiler=record, bw_compiler=record)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    x = x64(32).to(DEVICE)
    out, want = compiled(x).logits, eager(x).logits
    out.sum().backward()
    want.sum().backward()
    torch._dynamo.reset()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(model.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
    forward = graphs[0]
    # The stem, 3 blocks of 2 folds and a tail, 2 of the tails dual.
    assert forward.count("bn_apply.default") == 1 + 3 * 2 + 3 - 2
    assert forward.count("bn_dual_apply.default") == 2
    assert "batch_norm" not in forward


def import_graph(root) -> dict[str, set[str]]:
    """fused_residual's modules -> the fused_residual modules each imports (relative imports,
    at any depth of the file: imports inside functions count)."""
    import ast

    files = {".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__"): p
             for p in root.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imports = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
                imports.update(f"{target}.{a.name}" if f"{target}.{a.name}" in files else target
                               for a in node.names)
        graph[name] = imports - {name}
    return graph


def test_layers_import_downward():
    """The package's layers (op layer -> backends -> modules -> convert) import downward only:
    no import cycle among fused_residual's modules (the convert layer's `_norms` once imported
    `_torchvision`, which imported `_norms`). The package's __init__ imports every layer's API."""
    import pathlib

    graph = import_graph(pathlib.Path(fused_residual.__file__).parent)
    graph.pop("fused_residual")

    def visit(node, stack):
        assert node not in stack, f"import cycle: {' -> '.join([*stack, node])}"
        for nxt in graph.get(node, ()):
            visit(nxt, [*stack, node])

    for name in graph:
        visit(name, [])
