"""Build of the fused_residual C++/CUDA extension (`fused_residual._C`).

C++ CPU kernels always build; the CUDA kernels in csrc/cuda/*.cu build when torch has CUDA
and nvcc is found, unless FUSED_RESIDUAL_SKIP_CUDA=1. The build says what it compiles (see
it with `pip install -v`) and writes `fused_residual/_build_info.py`: the torch and CUDA
versions the extension was compiled against, and which kernels it has, so that an import
under another torch says so (fused_residual/ops.py) instead of failing quietly. A failed
extension build is not fatal for `import fused_residual` (the "extension" backend is then
reported unavailable), but `pip install` does fail on a compile error so that CI catches it.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# What this build compiles, filled in by _extensions(); build_ext prints _PLAN and writes
# _BUILD into _build_info.py.
_BUILD: dict[str, str | None] = {"why_no_cuda": None, "cuda_archs": None}
_PLAN: list[str] = []


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


def _why_no_cuda() -> str | None:
    """Why the CUDA kernels are not built, or None when they are."""
    if os.environ.get("FUSED_RESIDUAL_SKIP_CUDA", "0") == "1":
        return "FUSED_RESIDUAL_SKIP_CUDA=1"
    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return "nvcc not found (put it on PATH or set CUDA_HOME)"
    return None


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
    why_no_cuda = _why_no_cuda() if cuda_sources else "no csrc/cuda/*.cu sources"
    _BUILD["why_no_cuda"] = why_no_cuda
    _PLAN.append(f"C++ CPU kernels: {' '.join(sources)}")
    if why_no_cuda is None:
        _default_arch_list()
        _BUILD["cuda_archs"] = os.environ["TORCH_CUDA_ARCH_LIST"]
        _PLAN.append(f"CUDA kernels for architectures {_BUILD['cuda_archs']} (TORCH_CUDA_ARCH_LIST): "
                     f"{' '.join(cuda_sources)}")
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
    _PLAN.append(f"CUDA kernels skipped: {why_no_cuda}")
    return [
        CppExtension(
            "fused_residual._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags + openmp},
            extra_link_args=openmp,
        )
    ]


def _say(message: str) -> None:
    print(f"fused_residual build: {message}", file=sys.stderr, flush=True)


def _build_info_source() -> str:
    import torch

    with_cuda = _BUILD["why_no_cuda"] is None
    return (
        '"""Generated by setup.py when the extension was built (not in git): what fused_residual._C\n'
        'was compiled against; fused_residual/ops.py compares it with the running torch."""\n\n'
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"TORCH_CUDA_VERSION = {torch.version.cuda!r}  # torch.version.cuda of that torch\n"
        f"CUDA_KERNELS = {with_cuda!r}\n"
        f"CUDA_ARCHS = {_BUILD['cuda_archs']!r}\n"
        f"WHY_NO_CUDA = {_BUILD['why_no_cuda']!r}\n"
    )


def _cmdclass() -> dict:
    from torch.utils.cpp_extension import BuildExtension

    class BuildExtensionWithInfo(BuildExtension.with_options(use_ninja=True)):
        """torch's BuildExtension, then fused_residual/_build_info.py next to each copy of _C
        (the build directory, and the source tree for in-place and editable builds)."""

        def run(self) -> None:
            _say(f"compiling against torch {_torch_version()}")
            for line in _PLAN:
                _say(line)
            super().run()
            source = _build_info_source()
            dirs = {os.path.dirname(self.get_ext_fullpath("fused_residual._C"))}
            dirs.add(os.path.join(self.build_lib, "fused_residual"))
            for directory in sorted(dirs):
                os.makedirs(directory, exist_ok=True)
                with open(os.path.join(directory, "_build_info.py"), "w") as f:
                    f.write(source)
            _say(f"wrote _build_info.py in {', '.join(sorted(dirs))}")

    return {"build_ext": BuildExtensionWithInfo}


def _torch_version() -> str:
    import torch

    return f"{torch.__version__} (CUDA {torch.version.cuda})"


setup(ext_modules=_extensions(), cmdclass=_cmdclass())
