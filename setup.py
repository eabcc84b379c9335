"""Build of the fused_residual C++/CUDA extension (`fused_residual._C`).

C++ CPU kernels always build; the CUDA kernels in csrc/cuda/*.cu build when torch has CUDA
and nvcc is found, unless FUSED_RESIDUAL_SKIP_CUDA=1. A failed extension build is not
fatal for `import fused_residual` (the "extension" backend is then reported unavailable),
but `pip install` does fail on a compile error so that CI catches it.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _real_nvcc() -> str | None:
    """The nvcc binary that `nvcc` on PATH finally executes.

    On some machines nvcc on PATH is a one-line wrapper script (`exec /usr/local/cuda-X/bin/nvcc`)
    outside the toolkit; torch would then infer CUDA_HOME as the wrapper's parent and fail
    to link -lcudart. Follow symlinks and such wrappers to the real toolkit.
    """
    nvcc = shutil.which("nvcc")
    for _ in range(8):
        if nvcc is None:
            return None
        nvcc = os.path.realpath(nvcc)
        try:
            with open(nvcc, "rb") as f:
                head = f.read(4096)
        except OSError:
            return None
        if not head.startswith(b"#!"):
            return nvcc
        match = re.search(rb"(/\S+/bin/nvcc)\b", head[2:])
        if match is None:
            return nvcc
        nvcc = match.group(1).decode()
    return nvcc


def _resolve_cuda_home() -> None:
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = _real_nvcc()
    if nvcc is not None:
        home = os.path.dirname(os.path.dirname(nvcc))
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = home


def _want_cuda() -> bool:
    if os.environ.get("FUSED_RESIDUAL_SKIP_CUDA", "0") == "1":
        return False
    import torch

    if torch.version.cuda is None:
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))


def _default_arch_list() -> None:
    """TORCH_CUDA_ARCH_LIST from the environment, else the visible GPU's, else 8.0;9.0."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return
    import torch

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    else:
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"


def _extensions() -> list:
    _resolve_cuda_home()
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    # Baseline ISA for the build: a wheel built here must not die with SIGILL on an older CPU.
    # csrc/cpu/ compiles its kernels a second time for AVX2 in one file of its own and picks
    # that set at run time when the CPU has it.
    cxx_flags = ["-O3", "-std=c++20"]
    # at::parallel_for is inline OpenMP code in ATen's headers: without -fopenmp the
    # extension's loops run on one thread. Python-side, torch's own libgomp is reused.
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    include_dirs = [os.path.join(ROOT, "csrc")]
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    if cuda_sources and _want_cuda():
        _default_arch_list()
        return [
            CUDAExtension(
                "fused_residual._C",
                sources + cuda_sources,
                include_dirs=include_dirs,
                define_macros=[("FUSED_RESIDUAL_WITH_CUDA", "1")],
                extra_compile_args={
                    "cxx": cxx_flags + openmp,
                    # No fast-math: denormals kept (as in PyTorch), IEEE division and sqrt.
                    "nvcc": ["-O3", "-std=c++20", "-lineinfo", "-ftz=false", "-prec-div=true",
                             "-prec-sqrt=true"],
                },
                extra_link_args=openmp,
            )
        ]
    return [
        CppExtension(
            "fused_residual._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags + openmp},
            extra_link_args=openmp,
        )
    ]


def _cmdclass() -> dict:
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(ext_modules=_extensions(), cmdclass=_cmdclass())
