"""Check the source distribution: it holds every source the build needs, it builds and installs
with the extension, and the installed package imports from outside the repository.

    python scripts/check_sdist.py            # what .ci/run runs (about two minutes, CPU only)

1. `python -m build --sdist --no-isolation`; every file under csrc/ and tests/ (and the other
   MANIFEST.in directories) must be in it.
2. A fresh virtual environment with `--system-site-packages`: it reuses the torch already
   installed (the one the package will run with; a fresh torch is gigabytes), and the
   extension is compiled against that torch, as the README's "existing torch" route does
   (`pip install "setuptools>=77" ninja`, then `pip install --no-build-isolation --no-deps
   <sdist>`, CUDA skipped to save time).
3. From a directory outside the repository, the venv's Python imports fused_residual from
   the venv (not from this checkout or another install), loads its _C, finds the
   "extension" backend for CPU with build info matching the running torch, agrees with the
   reference, and `python -m fused_residual --no-timing` exits 0.
Exits non-zero, with what failed, on the first failure.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Directories whose every file must ship (build outputs and caches excluded).
SHIPPED_DIRS = ("csrc", "tests", "benchmarks", "examples", "docs", "scripts", "results", "fused_residual")
NOT_SHIPPED = ("__pycache__", ".so", ".pyc", "_build_info.py")

IMPORT_CHECK = """
import os, sys
import torch
import fused_residual
from fused_residual import ops
venv = os.path.realpath(sys.prefix)
where = os.path.realpath(fused_residual.__file__)
assert where.startswith(venv), f"fused_residual imported from {where}, not from the venv {venv}"
assert ops.EXTENSION_LOADED, ops.EXTENSION_ERROR
c_file = os.path.realpath(sys.modules["fused_residual._C"].__file__)
assert c_file.startswith(venv), f"_C loaded from {c_file}"
assert ops.BUILD_INFO.TORCH_VERSION == torch.__version__, ops.BUILD_INFO.TORCH_VERSION
assert "extension" in fused_residual.available_backends("cpu")
x, r = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
out = fused_residual.bn_add_relu(x, r, None, None, training=True, backend="extension")
ref = torch.relu(torch.nn.functional.batch_norm(x, None, None, training=True) + r)
torch.testing.assert_close(out, ref)
print(f"installed fused_residual imports from {where}; _C built against torch "
      f"{ops.BUILD_INFO.TORCH_VERSION} (CUDA kernels: {ops.BUILD_INFO.CUDA_KERNELS}, "
      f"{ops.BUILD_INFO.WHY_NO_CUDA})")
"""


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    print("+", " ".join(arg if "\n" not in arg else "<IMPORT_CHECK>" for arg in cmd), flush=True)
    return subprocess.run(cmd, check=True, text=True, **kwargs)


def expected_files() -> set[str]:
    files = {"setup.py", "pyproject.toml", "README.md", "RESULTS.md", "MANIFEST.in"}
    for directory in SHIPPED_DIRS:
        for path in (ROOT / directory).rglob("*"):
            rel = path.relative_to(ROOT).as_posix()
            if path.is_file() and not any(part in rel for part in NOT_SHIPPED):
                files.add(rel)
    return files


def check_contents(sdist: Path) -> None:
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    missing = sorted(expected_files() - names)
    if missing:
        sys.exit(f"the sdist lacks {len(missing)} file(s) (MANIFEST.in): {missing}")
    stale = sorted(name for name in names if any(part in name for part in NOT_SHIPPED))
    if stale:
        sys.exit(f"the sdist ships build products: {stale}")
    print(f"sdist {sdist.name}: {len(names)} entries, every source present", flush=True)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="fused_residual_sdist_") as tmp:
        work = Path(tmp)
        run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(work / "dist"),
             str(ROOT)])
        (sdist,) = (work / "dist").glob("*.tar.gz")
        check_contents(sdist)

        venv = work / "venv"
        run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)])
        python = str(venv / "bin" / "python")
        # Without build isolation the build uses the environment's own setuptools and ninja
        # (a venv's bundled setuptools can be older than pyproject's license field needs).
        run([python, "-m", "pip", "install", "-q", "setuptools>=77", "ninja"])
        env = {**os.environ, "FUSED_RESIDUAL_SKIP_CUDA": "1"}
        env.pop("PYTHONPATH", None)
        cmd = [python, "-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps", str(sdist)]
        print("+", " ".join(cmd), flush=True)
        build = subprocess.run(cmd, text=True, env=env, capture_output=True)
        if build.returncode != 0:
            print(build.stdout[-20000:], build.stderr[-20000:], sep="\n")
            sys.exit(f"pip install of the sdist failed (exit {build.returncode})")
        for line in build.stdout.splitlines() + build.stderr.splitlines():
            if "fused_residual build:" in line or "Successfully installed" in line:
                print("   ", line.strip(), flush=True)

        outside = work / "elsewhere"
        outside.mkdir()
        env.pop("FUSED_RESIDUAL_SKIP_CUDA")
        run([python, "-c", IMPORT_CHECK], cwd=outside, env=env)
        run([python, "-m", "fused_residual", "--no-timing"], cwd=outside, env=env)
    print("sdist check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
