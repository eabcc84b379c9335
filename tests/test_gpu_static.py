"""Static GPU checks that need no GPU: what the sm_90 (H100 / H200) compilers make of the
kernels, read from their output.

* Triton: every kernel variant the launchers pick for the ten ResNet-50 cases (N = 128;
  (64, 56, 56), (256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7); bf16
  channels_last and fp32 NCHW), forward, backward, eval and dual, plus small cases for the
  other dtypes and flags, is compiled ahead of time for sm_90 (tests/triton_aot.py, in a
  subprocess without TRITON_INTERPRET). Fails on a spill, on registers above the launch
  plan's budget (`_common.planned_programs_per_sm`), on an element-wise kernel without
  128-bit global loads and stores, or on flush-to-zero arithmetic (denormals must survive,
  as in PyTorch).
* CUDA extension: the sm_90 cubin of the `_C` library that `fused_residual` imports, read
  with cuobjdump: no local memory or stack (spills), registers within each kernel's
  `__launch_bounds__`, every kernel with launch bounds, no flush-to-zero multiplies (`FMUL.FTZ`,
  `FFMA.FTZ`: a fast-math build).

Both print their table (pytest -s, or in the failure message). They stand in for a GPU
until a GPU run confirms them; they are not a substitute for one.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
REGISTERS_PER_SM = 65536
THREADS_PER_SM = 2048
SHARED_PER_SM = 228 * 1024
RESNET50_CASES = [f"resnet50 {fmt} {c}x{h}x{w}" for fmt in ("bf16-cl", "fp32-nchw")
                  for c, h, w in ((64, 56, 56), (256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7))]
STEPS = ("forward", "backward", "eval", "dual")


def register_budget(programs_per_sm: int, threads: int) -> int:
    """Most registers per thread that keep `programs_per_sm` programs of `threads` threads
    resident on one SM (allocated per thread in units of 8, at most 255)."""
    return min(255, REGISTERS_PER_SM // (programs_per_sm * threads) // 8 * 8)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)) for row in [header, *rows]]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Triton
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def triton_kernels() -> list[dict]:
    pytest.importorskip("triton.backends.nvidia", reason="compiling for sm_90 needs Triton's NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "triton_aot.py")], env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_triton_kernels_fit_their_sm90_launch_plans(triton_kernels):
    rows, failures = [], []
    for k in triton_kernels:
        threads = 32 * k["num_warps"]
        budget = register_budget(k["programs_per_sm"], threads)
        config = " ".join([*(f"{n}={v}" for n, v in k["config"].items()), f"warps={k['num_warps']}",
                           *k["flags"]])
        more = f" (+{len(k['cases']) - 1})" if len(k["cases"]) > 1 else ""
        rows.append([k["kernel"], config, k["registers"], budget, k["stack"] + k["local"], k["shared"],
                     k["ld_bits"], k["st_bits"], k["cases"][0] + more])
        where = f"{k['kernel']} [{config}] in {k['cases'][0]}"
        if k["stack"] or k["local"]:
            failures.append(f"{where}: {k['stack']} bytes of stack, {k['local']} of local memory (spills)")
        if k["registers"] > budget:
            failures.append(f"{where}: {k['registers']} registers > {budget}, the budget of "
                            f"{k['programs_per_sm']} resident programs per SM")
        programs = k["programs_per_sm"]
        if programs * threads > THREADS_PER_SM or programs * k["shared"] > SHARED_PER_SM:
            failures.append(f"{where}: {k['programs_per_sm']} programs of {threads} threads and "
                            f"{k['shared']} bytes of shared memory do not fit one SM")
        if k["plan"] == "elementwise" and (k["ld_bits"] < 128 or k["st_bits"] < 128):
            failures.append(f"{where}: widest global load {k['ld_bits']} bits, store {k['st_bits']} bits "
                            f"(want 128-bit accesses)")
        if k["ftz"]:
            failures.append(f"{where}: flush-to-zero arithmetic in the PTX: {k['ftz']}")
    table = _table(rows, ["kernel", "config", "regs", "budget", "spill/stack B", "shared B", "ld bits",
                          "st bits", "first case"])
    print(f"\nTriton kernels compiled for sm_90 ({len(rows)} variants)\n{table}")
    assert not failures, "\n".join(failures) + "\n\n" + table


def test_triton_aot_covers_the_resnet50_cases(triton_kernels):
    """Every ResNet-50 case and step launched kernels, and each step's kernels include the
    ones it must run (the table above is not vacuous)."""
    launched = {case for k in triton_kernels for case in k["cases"]}
    need = {"forward": {"_stats_partial", "_stats_merge_kernel", "_update_running_stats_kernel", "_apply_"},
            "backward": {"_reduce_partial", "_reduce_merge_kernel", "_backward_apply_"},
            "eval": {"_apply_", "_backward_apply_"},
            "dual": {"_stats_partial", "_apply_", "_reduce_partial", "_backward_apply_"}}
    for case in RESNET50_CASES:
        for step in STEPS:
            assert f"{case} {step}" in launched, f"{case} {step}"
            names = {k["kernel"] for k in triton_kernels if f"{case} {step}" in k["cases"]}
            for prefix in need[step]:
                assert any(n.startswith(prefix) for n in names), (case, step, prefix, names)
    # Flat mode (NCHW 14x14 and 7x7) runs its coefficient prologue, the other shapes rows mode.
    flat = {k["kernel"] for k in triton_kernels if "resnet50 fp32-nchw 2048x7x7 forward" in k["cases"]}
    assert {"_apply_coeffs_kernel", "_apply_flat_kernel"} <= flat, flat


# --------------------------------------------------------------------------------------
# CUDA extension
# --------------------------------------------------------------------------------------


def _cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    if found:
        return found
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "cuobjdump")):
        return os.path.join(CUDA_HOME, "bin", "cuobjdump")
    try:
        import triton

        return triton.knobs.nvidia.cuobjdump.path  # Triton bundles one
    except Exception:
        return None


def _extension_library() -> str:
    from fused_residual import ops

    if not ops.EXTENSION_LOADED:
        pytest.skip(f"the C++/CUDA extension is not built or failed to load: {ops.EXTENSION_ERROR}")
    import fused_residual._C as ext

    if not torch._C._dispatch_has_kernel_for_dispatch_key("fused_residual::bn_apply", "CUDA"):
        pytest.skip(f"{ext.__file__} was built without CUDA kernels (FUSED_RESIDUAL_SKIP_CUDA=1, no nvcc, "
                    "or a CPU-only torch)")
    return ext.__file__


def parse_resource_usage(text: str) -> dict[str, dict[str, int]]:
    """{function: {REG, STACK, SHARED, LOCAL}} from `cuobjdump --dump-resource-usage`."""
    out = {}
    for name, usage in re.findall(r"Function (\S+):\s*\n\s*(REG:.*)", text):
        out[name] = {key: int(val) for key, val in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage)}
    return out


_NV_INFO_ATTRIBUTE = (r"Attribute:\s*EIATTR_(MAXREG_COUNT|MAX_THREADS)\s*\n\s*Format:\s*\S+\s*\n"
                      r"\s*Value:\s*(0x[0-9a-f]+)")


def parse_launch_bounds(text: str) -> dict[str, dict[str, int]]:
    """{function: {MAXREG_COUNT, MAX_THREADS}} from the .nv.info sections of `cuobjdump -elf`."""
    out: dict[str, dict[str, int]] = {}
    for section in re.split(r"\n(?=\.nv\.info\.)", text):
        head = re.match(r"\.nv\.info\.(\S+)", section)
        if not head:
            continue
        attrs = out.setdefault(head.group(1), {})
        for attr, value in re.findall(_NV_INFO_ATTRIBUTE, section):
            attrs[attr] = int(value, 16)
    return out


def test_cuda_extension_fits_its_launch_bounds_on_sm90():
    cuobjdump = _cuobjdump()
    if cuobjdump is None:
        pytest.skip("cuobjdump not found (PATH, CUDA_HOME/bin, Triton's bundled tools)")
    library = _extension_library()

    def dump(*args: str) -> str:
        proc = subprocess.run([cuobjdump, "-arch", "sm_90", *args, library], capture_output=True, text=True)
        if proc.returncode != 0 or "arch = sm_90" not in proc.stdout:
            pytest.skip(f"{library} has no sm_90 code (TORCH_CUDA_ARCH_LIST without 9.0?): "
                        f"{proc.stderr.strip()[:300]}")
        return proc.stdout

    usage = parse_resource_usage(dump("--dump-resource-usage"))
    bounds = parse_launch_bounds(dump("-elf"))
    sass = dump("-sass")
    assert usage, "no kernels in the sm_90 cubin"
    rows, failures = [], []
    cxxfilt = shutil.which("c++filt")
    names = (subprocess.run([cxxfilt], input="\n".join(usage), capture_output=True, text=True).stdout
             if cxxfilt else "").splitlines()
    demangled = dict(zip(usage, names, strict=False))
    for name, res in usage.items():
        short = demangled.get(name, name)
        for noise, short_form in ((r"fused_residual::cuda::|\(anonymous namespace\)::|c10::", ""),
                                  (r"AccOf<[^>]*>::type", "acc")):
            short = re.sub(noise, short_form, short)
        short = short[:100]
        b = bounds.get(name, {})
        maxreg, threads = b.get("MAXREG_COUNT", 255), b.get("MAX_THREADS", 0)
        resident = REGISTERS_PER_SM // (max(8, -(-res["REG"] // 8) * 8) * max(threads, 1))
        rows.append([short, res["REG"], maxreg, threads, min(resident, THREADS_PER_SM // max(threads, 1)),
                     res["STACK"] + res["LOCAL"], res["SHARED"]])
        if res["STACK"] or res["LOCAL"]:
            failures.append(f"{short}: {res['STACK']} bytes of stack, {res['LOCAL']} of local memory "
                            "(spills)")
        if threads != 256:
            failures.append(f"{short}: no __launch_bounds__(kBlock, ...) (max threads {threads})")
        if res["REG"] > maxreg:
            failures.append(f"{short}: {res['REG']} registers > {maxreg} of its __launch_bounds__")
    # A fast-math build multiplies with .FTZ everywhere. Without it, FADD.FTZ remains only in
    # the IEEE division's slow path, on operands it has scaled away from the denormal range.
    ftz = sorted(set(re.findall(r"\bF(?:MUL|FMA)\.FTZ\b", sass)))
    if ftz:
        failures.append(f"flush-to-zero float arithmetic in the SASS: {ftz} (built with fast-math?)")
    table = _table(rows, ["kernel", "regs", "maxreg", "threads", "blocks/SM", "spill/stack B", "shared B"])
    print(f"\nCUDA kernels of {library}, sm_90 ({len(rows)} kernels)\n{table}")
    assert not failures, "\n".join(failures) + "\n\n" + table


def test_cuobjdump_parsers():
    """The parsers above on cuobjdump's formats (so that a format change fails loudly, not
    silently with an empty table)."""
    usage = parse_resource_usage(
        "Resource usage:\n Common:\n  GLOBAL:28\n Function _Z3fooPf:\n"
        "  REG:40 STACK:8 SHARED:1024 LOCAL:4 CONSTANT[0]:600 TEXTURE:0\n")
    assert usage == {"_Z3fooPf": {"REG": 40, "STACK": 8, "SHARED": 1024, "LOCAL": 4}}
    bounds = parse_launch_bounds(
        ".nv.info._Z3fooPf\n\t<0x1>\n\tAttribute:\tEIATTR_MAXREG_COUNT\n\tFormat:\tEIFMT_HVAL\n\tValue:\t0x40\n"
        "\t<0x2>\n\tAttribute:\tEIATTR_MAX_THREADS\n\tFormat:\tEIFMT_SVAL\n\tValue:\t0x100 0x1 0x1 \n")
    assert bounds == {"_Z3fooPf": {"MAXREG_COUNT": 64, "MAX_THREADS": 256}}
    assert register_budget(4, 256) == 64 and register_budget(3, 256) == 80 and register_budget(1, 128) == 255
