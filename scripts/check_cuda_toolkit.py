"""Before a CUDA build (.ci/run's oldest-torch leg): does the nvcc on PATH (or in CUDA_HOME)
have the CUDA major version of the running torch's build? torch.utils.cpp_extension refuses
to compile an extension across a CUDA major mismatch (a minor one only warns), deep inside a
pip log; this says so first, with both versions and what to change.

    python scripts/check_cuda_toolkit.py      # exit 0: they match; 1: they do not, or no nvcc
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import torch


def nvcc_release() -> tuple[str | None, str]:
    """(release "13.0" or None, the nvcc that was asked)."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = os.path.join(home, "bin", "nvcc") if home else shutil.which("nvcc")
    if nvcc is None or not os.path.exists(nvcc):
        return None, str(nvcc)
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\d+\.\d+)", out)
    return (m.group(1) if m else None), nvcc


def main() -> int:
    torch_cuda = torch.version.cuda
    release, nvcc = nvcc_release()
    print(f"torch {torch.__version__} is built for CUDA {torch_cuda}; {nvcc} is CUDA {release}")
    if torch_cuda is None:
        print("error: this torch is a CPU-only build: no CUDA kernels can be built against it")
        return 1
    if release is None:
        print(
            "error: no nvcc found (PATH, CUDA_HOME): install the CUDA toolkit of major version "
            f"{torch_cuda.split('.')[0]}"
        )
        return 1
    want, have = torch_cuda.split(".")[0], release.split(".")[0]
    if have != want:
        print(
            f"error: CUDA major mismatch: torch wants CUDA {want}.x, nvcc is {release}. Install the "
            f"torch wheel built for CUDA {have} (its +cu{have}x variant) or put a CUDA {torch_cuda} "
            "toolkit first on PATH / in CUDA_HOME"
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
