"""Loading the package: what `import fused_residual` imports, and what it says when the
compiled extension is missing, broken or built against another torch (fused_residual/ops.py,
the build info written by setup.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fused_residual
from fused_residual import backends, ops

PACKAGE = Path(fused_residual.__file__).parent


def run_python(code: str, path: Path | str, cwd: Path | str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(path), "TRITON_INTERPRET": "0"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=cwd or path, timeout=300)


def copy_package(dest: Path, with_extension: bool) -> Path:
    """A copy of the package under dest/, with or without the compiled extension."""
    shutil.copytree(PACKAGE, dest / "fused_residual", ignore=shutil.ignore_patterns(
        "__pycache__", *([] if with_extension else ["_C.*", "_build_info.py"])))
    return dest / "fused_residual"


def test_import_does_not_import_dynamo():
    """torch._dynamo costs about a second to import; only torch.compile needs it."""
    done = run_python("import sys, fused_residual; print('torch._dynamo' in sys.modules)",
                      PACKAGE.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_assume_constant_result_marks_like_torch():
    """The lazy marker (_dynamo.assume_constant_result, as backends imports it) sets what
    torch's decorator sets."""
    import torch._dynamo  # torch's decorator needs it; popped below for ours

    def ours():
        return 1

    def theirs():
        return 1

    saved = sys.modules.pop("torch._dynamo")
    try:
        backends.assume_constant_result(ours)
    finally:
        sys.modules["torch._dynamo"] = saved
    torch.compiler.assume_constant_result(theirs)
    assert ours.__dict__ == theirs.__dict__ and ours.__dict__
    assert backends.resolve_backend.__dict__ == theirs.__dict__


def test_build_info_records_the_build_torch():
    if ops.BUILD_INFO is None:
        pytest.skip("extension built by an older setup.py, without _build_info.py")
    assert ops.BUILD_INFO.TORCH_VERSION == torch.__version__
    assert ops.BUILD_INFO.CUDA_KERNELS == (ops.BUILD_INFO.WHY_NO_CUDA is None)


@pytest.mark.skipif(not ops.EXTENSION_LOADED, reason="needs the built extension to copy")
@pytest.mark.parametrize("checkout", [True, False], ids=["checkout", "installed"])
def test_torch_mismatch_warns_once_with_reason_and_fix(tmp_path, checkout):
    """An extension compiled against another torch is not loaded: one warning at import names
    both versions and the exact command to fix it; "auto" then runs the reference quietly."""
    package = copy_package(tmp_path, with_extension=True)
    info = (package / "_build_info.py").read_text()
    (package / "_build_info.py").write_text(
        info.replace(f"TORCH_VERSION = {torch.__version__!r}", "TORCH_VERSION = '2.0.0+fake'"))
    if checkout:
        (tmp_path / "setup.py").write_text("")
    code = """
import warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import torch, fused_residual
    x = torch.randn(4, 3, 5, 5)
    for _ in range(3):
        out = fused_residual.bn_add_relu(x, x, torch.zeros(3), torch.ones(3), training=True)
assert "extension" not in fused_residual.available_backends("cpu")
ref = torch.relu(torch.nn.functional.batch_norm(x, None, None, training=True) + x)
torch.testing.assert_close(out, ref)
for w in caught:
    print("WARNING", w.category.__name__, w.message)
"""
    done = run_python(code, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    warned = [line for line in done.stdout.splitlines() if line.startswith("WARNING")]
    assert len(warned) == 1, warned
    message = warned[0]
    assert "RuntimeWarning" in message
    assert "compiled against torch 2.0.0+fake" in message and f"torch {torch.__version__}" in message
    fix = (f"cd {tmp_path} && pip install --no-build-isolation -e ." if checkout
           else "pip install --no-build-isolation .")
    assert fix in message


@pytest.mark.parametrize("how", ["not_built", "blocked"])
def test_missing_extension_says_not_built(tmp_path, how):
    """No _C: one warning saying so and how to build it, never a raw circular-import error."""
    if how == "not_built":
        copy_package(tmp_path, with_extension=False)
        # An editable install of another checkout (a finder after the path finder) would
        # supply its own _C for the missing one.
        path, prelude = tmp_path, ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if "
                                   "'editable' not in getattr(f, '__module__', '').lower()]\n")
    else:  # _C present but not importable
        path, prelude = PACKAGE.parent, "import sys; sys.modules['fused_residual._C'] = None\n"
    code = prelude + """
import warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import fused_residual
from fused_residual import ops
assert not ops.EXTENSION_LOADED
for w in caught:
    print("WARNING", w.message)
"""
    done = run_python(code, path, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    warned = [line for line in done.stdout.splitlines() if line.startswith("WARNING")]
    assert len(warned) == 1, warned
    assert "fused_residual._C is not built" in warned[0] and "--no-build-isolation" in warned[0]
    assert "circular import" not in done.stdout + done.stderr


def test_build_mismatch():
    class Info:
        TORCH_VERSION = "2.13.0+cpu"
        TORCH_CUDA_VERSION = None

    assert ops.build_mismatch(None, "2.14.1") is None
    assert ops.build_mismatch(Info, "2.13.0+cpu") is None
    message = ops.build_mismatch(Info, "2.14.1+cu130")
    assert "compiled against torch 2.13.0+cpu (CUDA None)" in message and "2.14.1+cu130" in message


def test_cuda_backends_need_a_gpu():
    """available_backends("cuda") lists a fused backend only where it can run."""
    names = fused_residual.available_backends("cuda")
    if not torch.cuda.is_available():
        assert names == ["reference"]
        for name in ("extension", "triton"):
            assert backends.why_unavailable(name, "cuda")
    assert backends.why_unavailable("reference", "cuda") is None
    for name in names[:-1]:
        assert backends.why_unavailable(name, "cuda") is None
