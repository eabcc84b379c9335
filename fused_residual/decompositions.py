"""The fused ops in aten ops, for programs that must run without this library.

An ONNX graph, a torch.export program loaded where fused_residual is not installed, or a
TorchScript file cannot hold `fused_residual::*` ops. Two layers see to it:

- Op layer: `decompositions()` maps each fused op (the extension's eight and, once
  `fused_residual.triton` is imported, the Triton backend's eight) to the same computation in
  aten ops: the apply ops to `_native_batch_norm_legit_no_training` (an eval BatchNorm on the
  given mean and variance: ONNX BatchNormalization) + add + relu, computed in the statistics
  dtype and rounded once to the input's, as the kernels do; the others to their reference
  (`reference.py`). They are registered in `torch._decomp.decomposition_table`, which
  `torch.onnx.export` (the dynamo exporter, torch 2.11 to 2.14:
  `_decomp.create_onnx_friendly_decomposition_table`) consults for ops without an ONNX
  translation, so even a graph that calls the ops directly exports to standard ONNX ops.
  `export.export_unfused` applies them to a torch.export program. One side effect, checked by
  tests/test_export.py: under symbolic shapes (torch.compile with dynamic shapes) fake tensors
  take an op's output metadata from its decomposition, which matches its fake kernel.
- Functional layer: `exporting_unfused()` is true under `torch.onnx.export` (either exporter),
  `torch.jit.trace` and `unfused()`; `bn_add_relu` and `dual_bn_add_relu` then compute
  F.batch_norm + add + relu, so the graph is the unconverted model's (BatchNormalization /
  Add / Relu in ONNX, aten::batch_norm in TorchScript), in training mode too, where the
  in-place running-statistics op would otherwise stay in the graph as a functionalized
  custom op.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from . import reference as _ref
from .reference import acc_dtype, pack_mask, working_layout

try:  # the flag torch.onnx.is_in_onnx_export() reads for the dynamo exporter (torch 2.11-2.14)
    from torch.onnx._internal.exporter import _flags as _onnx_flags
except ImportError:  # pragma: no cover - a torch without it: ask the public function
    _onnx_flags = None

_unfused_depth = 0


@contextlib.contextmanager
def unfused() -> Iterator[None]:
    """Within it, `bn_add_relu`, `dual_bn_add_relu` (and the modules and converted models
    that call them) compute F.batch_norm + add + relu instead of the fused ops: for tracing
    a program with exporters other than torch.onnx.export and torch.jit.trace (which switch
    by themselves). Not thread-local."""
    global _unfused_depth
    _unfused_depth += 1
    try:
        yield
    finally:
        _unfused_depth -= 1


_tracing_state = torch._C._get_tracing_state  # what torch.jit.is_tracing() asks, minus a call


def exporting_unfused() -> bool:
    """Whether the functional API computes the unfused composition: inside `unfused()`,
    `torch.jit.trace` (and the legacy ONNX exporter, which traces) or `torch.onnx.export`.
    Cheap (it runs on every call): two flag reads and the jit tracer's state, which
    torch.compile folds to None (torch 2.11 to 2.14)."""
    if _unfused_depth or _tracing_state() is not None:
        return True
    if _onnx_flags is None:  # pragma: no cover
        return torch.onnx.is_in_onnx_export()
    return _onnx_flags._is_onnx_exporting


def _to(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


def _normalized(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None,
                eps: float, acc: torch.dtype) -> Tensor:
    """Eval BatchNorm of `x` on (mean, var) in `acc`: one BatchNormalization node in ONNX."""
    return torch.ops.aten._native_batch_norm_legit_no_training.default(
        x.to(acc), _to(weight, acc), _to(bias, acc), mean.to(acc), var.to(acc), 0.0, eps)[0]


def _relu_outputs(y: Tensor, input: Tensor, save_mask: bool) -> tuple[Tensor, Tensor]:
    """(relu(y) in input's dtype and working layout, the packed mask of y > 0 or an empty
    one): the outputs of an apply op (docs/op_layer.md)."""
    layout = working_layout(input)
    out = torch.relu(y).to(input.dtype).contiguous(memory_format=layout)
    mask = pack_mask(y > 0, layout) if save_mask else input.new_empty((0,), dtype=torch.uint8)
    return out, mask


def bn_apply_decomposition(input: Tensor, residual: Tensor | None, mean: Tensor, var: Tensor,
                           weight: Tensor | None, bias: Tensor | None, eps: float,
                           save_mask: bool) -> tuple[Tensor, Tensor]:
    acc = acc_dtype(input.dtype)
    y = _normalized(input, mean, var, weight, bias, eps, acc)
    if residual is not None:
        y = y + residual.to(acc)
    return _relu_outputs(y, input, save_mask)


def bn_dual_apply_decomposition(input: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None,
                                bias: Tensor | None, input2: Tensor, mean2: Tensor, var2: Tensor,
                                weight2: Tensor | None, bias2: Tensor | None, eps: float, eps2: float,
                                save_mask: bool) -> tuple[Tensor, Tensor]:
    acc = acc_dtype(input.dtype)
    y = (_normalized(input, mean, var, weight, bias, eps, acc)
         + _normalized(input2, mean2, var2, weight2, bias2, eps2, acc))
    return _relu_outputs(y, input, save_mask)


def bn_train_forward_decomposition(input: Tensor, residual: Tensor | None, running_mean: Tensor | None,
                                   running_var: Tensor | None, weight: Tensor | None, bias: Tensor | None,
                                   momentum: float, eps: float,
                                   save_mask: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # The composite is its primitives (docs/op_layer.md): theirs, composed the same way.
    return _ref.train_forward_steps(_ref.bn_stats_reference, _ref.bn_update_running_stats_reference,
                                    bn_apply_decomposition, input, residual, running_mean, running_var,
                                    weight, bias, momentum, eps, save_mask)


# Op name (without a backend prefix) -> its decomposition.
_DECOMPOSITIONS: dict[str, Callable] = {
    "bn_stats": _ref.bn_stats_reference,
    "bn_update_running_stats": _ref.bn_update_running_stats_reference,
    "bn_apply": bn_apply_decomposition,
    "bn_backward_reduce": _ref.bn_backward_reduce_reference,
    "bn_backward_apply": _ref.bn_backward_apply_reference,
    "bn_dual_apply": bn_dual_apply_decomposition,
    "bn_train_forward": bn_train_forward_decomposition,
    "bn_backward": _ref.bn_backward_reference,
}
_PREFIXES = ("", "triton_")  # the extension's ops, the Triton backend's


def decompositions() -> dict[torch._ops.OpOverload, Callable]:
    """{op: its aten decomposition} for every fused op registered in this process, for
    `ExportedProgram.run_decompositions` and `make_fx(..., decomposition_table=...)`."""
    namespace = torch.ops.fused_residual
    return {getattr(namespace, prefix + name).default: fn
            for prefix in _PREFIXES for name, fn in _DECOMPOSITIONS.items()
            if hasattr(namespace, prefix + name)}


def register_decompositions() -> None:
    """Put `decompositions()` in torch's global decomposition table (see module docstring);
    called when the extension's ops load and when the Triton ops register."""
    torch._decomp.decomposition_table.update(decompositions())
