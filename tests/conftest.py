import os

import torch

# Without a GPU, the Triton backend runs through Triton's interpreter on CPU tensors. It
# must be switched on before triton is first imported (fused_residual.triton imports it).
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

torch.manual_seed(0)


# `pytest -m quick` (README, "Quick start"): a first check that runs in a few minutes on 2
# cores, where the whole suite takes half an hour or more. These files' tests on the
# extension and reference backends: the op layer, the functional API, the modules, the
# error messages and the benchmark report. Left to the full suite: Triton's interpreter
# (slow on CPU), torch.compile, whole models and convert(), distributed, packaging.
QUICK_FILES = frozenset({"test_ops.py", "test_functional.py", "test_errors.py", "test_modules.py",
                         "test_dual.py", "test_bench_report.py"})


def pytest_collection_modifyitems(config, items):
    import pytest

    for item in items:
        if item.path.name in QUICK_FILES and "triton" not in item.nodeid:
            item.add_marker(pytest.mark.quick)
