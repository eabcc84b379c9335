"""What the library tells torch.compile about its own functions, without importing
torch._dynamo at `import fused_residual`. The lowest layer: imports nothing of the package,
so the checks and the backend choice can both use it (no import cycle)."""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch


def assume_constant_result(fn: Callable) -> Callable:
    """`torch.compiler.assume_constant_result(fn)` without importing torch._dynamo (about a
    second) at `import fused_residual`: that decorator only marks `fn` with the attribute
    below, which Dynamo reads when it traces a call (tests/test_loading.py checks the two
    agree). Once torch._dynamo is imported, torch's own decorator is used."""
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return fn
