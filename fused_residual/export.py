"""Deploying a converted model (README, "Deploying a converted model").

- `torch.onnx.export(model, args)`, either exporter, gives standard ONNX ops
  (BatchNormalization / Add / Relu or what its optimizer folds them into), with nothing to
  add: the functional API computes the unfused composition while ONNX export runs, and the
  fused ops' aten decompositions are in the table the dynamo exporter uses
  (`decompositions.py`).
- `torch.export.export(model, args)` keeps the fused ops: the fastest program, which needs
  `import fused_residual` before `torch.export.load`. `export_unfused(model, args)` gives
  one in aten ops only, which loads and runs where fused_residual is not installed.
- `torch.jit.trace(model.eval(), args)` records the unfused composition (aten::batch_norm,
  add, relu): it passes trace's own check, saves, and loads without fused_residual.
  `torch.jit.script` refuses a fused module at once, naming it and these alternatives.
"""

from __future__ import annotations

from typing import Any

import torch

from .decompositions import decompositions, unfused


def export_unfused(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None,
                   **options: Any) -> torch.export.ExportedProgram:
    """`torch.export.export(model, args, kwargs, **options)` with every fused op in aten ops,
    so that the program (`torch.export.save` / `torch.export.load`) runs where
    fused_residual is not installed, in the mode `model` is in.

    Converted modules and the functional API compute F.batch_norm + add + relu while it
    traces (`unfused()`), which is the unconverted model's graph in either mode; fused ops a
    model calls directly are decomposed afterwards (`decompositions()`, eval-mode ops only:
    the in-place running-statistics op of a training graph cannot be decomposed once
    functionalized). The program is otherwise what torch.export.export returns (the same IR,
    no core-aten decomposition).
    """
    with unfused():
        program = torch.export.export(model, args, kwargs, **options)
    table = decompositions()
    if any(node.target in table for node in program.graph.nodes):
        program = program.run_decompositions(table)
    return program


__all__ = ["export_unfused", "unfused"]
