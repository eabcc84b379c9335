import os
import random

import pytest
import torch

# Without a GPU, the Triton backend runs through Triton's interpreter on CPU tensors. It
# must be switched on before triton is first imported (fused_residual.triton imports it).
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _seeded_global_rngs():
    """Every test starts from the same state of the global RNGs (torch, CUDA, Python's), so
    what a test draws from them does not depend on which tests ran before it, in any order
    (CI runs one leg in a shuffled order, .ci/run). Tests that build their data draw it from
    generators of their own (tests/helpers.py make_case); this covers the rest (module
    initializations, PyTorch's sample inputs)."""
    torch.manual_seed(0)
    random.seed(0)
    yield
