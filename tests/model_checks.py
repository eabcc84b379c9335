"""Whole-model checks shared by the FrozenBatchNorm2d / detection and timm tests: randomized
norm layers, a forward + backward step, and the tolerance rule on its results.

Parameter gradients of convolutions and linear layers are sums of n products (n = N·H·W
per output channel of a conv, the number of rows of a linear layer, summed over every call
of a shared layer), so a last-place difference in the gradient the fused op feeds them may
grow n-fold: their atol scale is n·max(1, max|truth|), the summation bound test_convert.py
and test_modules.py use for conv weights.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from helpers import assert_within_rule
from torchvision.ops.misc import FrozenBatchNorm2d


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every BatchNorm2d / FrozenBatchNorm2d: weight and bias away from 1 and 0, running
    statistics away from 0 and 1 (so a dropped affine term or unused statistic shows)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d | FrozenBatchNorm2d):
                c = m.running_mean.numel()
                for t, values in ((m.weight, torch.rand(c, generator=g) + 0.5),
                                  (m.bias, torch.rand(c, generator=g) - 0.5),
                                  (m.running_mean, torch.randn(c, generator=g) * 0.1),
                                  (m.running_var, torch.rand(c, generator=g) + 0.5)):
                    t.copy_(values)
    return model


def summed_terms(model: nn.Module, run) -> dict[str, int]:
    """n of each conv / linear parameter gradient (see module doc), from one call of `run()`."""
    terms: dict[str, int] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            def hook(mod, inp, out, name=name):
                n = out.numel() // out.shape[1 if isinstance(mod, nn.Conv2d) else -1]
                for p in ("weight", "bias"):
                    terms[f"{name}.{p}"] = terms.get(f"{name}.{p}", 0) + n

            handles.append(m.register_forward_hook(hook))
    with torch.no_grad():
        run()
    for h in handles:
        h.remove()
    return terms


def check_gradients(got: dict, want: dict, exact: dict, terms: dict[str, int]) -> int:
    """The rule on every parameter gradient of `exact` (float64); returns how many."""
    assert set(got) == set(want) == set(exact), set(got) ^ set(exact)
    for name, value in exact.items():
        scale = terms[name] * max(1.0, value.abs().max().item()) if name in terms else None
        assert_within_rule(name, got[name], want[name], value, torch.float32, scale)
    return len(exact)


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
