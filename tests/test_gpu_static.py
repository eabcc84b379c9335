"""Static GPU checks that need no GPU: what the sm_90 (H100 / H200) compilers make of the
kernels, read from their output.

* Triton: every kernel variant the launchers pick for the ten ResNet-50 cases (N = 128;
  (64, 56, 56), (256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7); bf16
  channels_last and fp32 NCHW), forward, backward, eval and dual, plus small cases for the
  other dtypes and flags, is compiled ahead of time for sm_90 (tests/triton_aot.py, in a
  subprocess without TRITON_INTERPRET). Fails on a spill, on registers above the launch
  plan's budget (`_common.planned_programs_per_sm`), on an element-wise kernel without
  128-bit global loads and stores, or on any approximate or flush-to-zero instruction
  (tests/ptx_checks.py: `.ftz` anywhere, `sqrt`/`rcp`/`div` other than `.rn`, any
  `rsqrt`/`ex2`/`lg2`): PyTorch keeps denormals and computes invstd with IEEE sqrt and
  division.
* CUDA extension: the sm_90 cubin of the `_C` library that `fused_residual` imports, read
  with cuobjdump: no local memory and no spill traffic in a loop (LDL/STL), registers
  within each kernel's `__launch_bounds__`, every kernel with launch bounds, no `FFMA.FTZ`
  (a fast-math build); and where the library embeds PTX (built with
  TORCH_CUDA_ARCH_LIST="9.0+PTX", as CI's oldest-torch leg builds it), no approximate or
  flush-to-zero instruction in it, as for Triton. SASS cannot tell: an IEEE sqrt also
  starts from MUFU.RSQ.

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
from ptx_checks import float_math, inexact_math, is_inexact

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
        aligned = [case for case in k["cases"] if "offset" not in case]  # offset 1: no 16-byte vectors
        if k["plan"] == "elementwise" and aligned and (k["ld_bits"] < 128 or k["st_bits"] < 128):
            failures.append(f"{where}: widest global load {k['ld_bits']} bits, store {k['st_bits']} bits "
                            f"(want 128-bit accesses)")
        if k["inexact"]:
            failures.append(f"{where}: approximate or flush-to-zero instructions in the PTX: {k['inexact']}")
    table = _table(rows, ["kernel", "config", "regs", "budget", "spill/stack B", "shared B", "ld bits",
                          "st bits", "first case"])
    print(f"\nTriton kernels compiled for sm_90 ({len(rows)} variants)\n{table}")
    assert not failures, "\n".join(failures) + "\n\n" + table


def test_triton_invstd_and_divisions_are_ieee(triton_kernels):
    """The kernels that compute invstd or divide by a count do it with `sqrt.rn` and `div.rn`
    (the check above fails on any other form; this one fails if the IEEE forms vanished, e.g.
    a kernel that no longer computes invstd in the compiled variants)."""
    spellings = {s for k in triton_kernels for s in k["float_math"]}
    assert {"sqrt.rn.f32", "div.rn.f32", "sqrt.rn.f64"} <= spellings, sorted(spellings)
    invstd_kernels = ("_apply_rows_kernel", "_apply_coeffs_kernel", "_backward_apply_rows_kernel",
                      "_backward_coeffs_kernel", "_reduce_merge_kernel")
    for k in triton_kernels:
        if k["kernel"] in invstd_kernels:
            assert {"sqrt.rn.f32", "sqrt.rn.f64"} & set(k["float_math"]), (k["kernel"], k["float_math"])
        if k["kernel"] in ("_stats_merge_kernel", "_backward_coeffs_kernel") and "IS_F64" not in k["flags"]:
            assert "div.rn.f32" in k["float_math"], (k["kernel"], k["float_math"])  # the / count


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


def split_sass(text: str) -> dict[str, str]:
    """{function: its SASS} from `cuobjdump -sass`."""
    parts = re.split(r"^\s*Function : (\S+)\s*$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


_SASS_ADDRESS = r"/\*([0-9a-f]{4,})\*/"


def local_accesses_in_loops(sass: str) -> int:
    """Local-memory accesses (LDL, STL: spill traffic) inside a loop of one function's SASS,
    a loop being the addresses from a backward branch's target to the branch.

    The IEEE sqrt and division branch to a slow-path subroutine for rare operands. A kernel
    that computes many of them under a tight register cap (the dual apply's 16 invstd values
    per thread, 64 registers) may save a register pair to an 8-byte stack frame at entry and
    reload it once after the per-channel prologue: stack, but no traffic in its loop."""
    local = [int(a, 16) for a in re.findall(_SASS_ADDRESS + r"\s+(?:@!?P\w+\s+)?(?:LDL|STL)\b", sass)]
    branch = _SASS_ADDRESS + r"\s+(?:@!?U?P\w+\s+)?BRA(?:\.\w+)*\s+(?:`\(\S*?)?0x([0-9a-f]+)"
    loops = [(int(dst, 16), int(src, 16)) for src, dst in re.findall(branch, sass)]
    return sum(1 for a in local if any(lo <= a <= hi for lo, hi in loops if lo < hi))


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
    sass_of = split_sass(sass)
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
        in_loops = local_accesses_in_loops(sass_of.get(name, ""))
        if res["LOCAL"] or (res["STACK"] and in_loops):
            failures.append(f"{short}: {res['STACK']} bytes of stack, {res['LOCAL']} of local memory, "
                            f"{in_loops} local accesses in loops (spills)")
        if threads != 256:
            failures.append(f"{short}: no __launch_bounds__(kBlock, ...) (max threads {threads})")
        if res["REG"] > maxreg:
            failures.append(f"{short}: {res['REG']} registers > {maxreg} of its __launch_bounds__")
    # A fast-math build (-ftz=true) contracts and flushes: FFMA.FTZ everywhere. Without it,
    # FMUL.FTZ, FADD.FTZ and FSETP.FTZ remain inside the IEEE sqrt and division sequences, on
    # operands they have scaled away from the denormal range (their slow path takes the rest);
    # test_cuda_extension_ptx_is_ieee reads the PTX, where the source's own choices show.
    ftz = sorted(set(re.findall(r"\bFFMA\.FTZ\b", sass)))
    if ftz:
        failures.append(f"flush-to-zero float arithmetic in the SASS: {ftz} (built with fast-math?)")
    table = _table(rows, ["kernel", "regs", "maxreg", "threads", "blocks/SM", "spill/stack B", "shared B"])
    print(f"\nCUDA kernels of {library}, sm_90 ({len(rows)} kernels)\n{table}")
    assert not failures, "\n".join(failures) + "\n\n" + table


def test_cuda_extension_ptx_is_ieee():
    """invstd is 1 / sqrt with a correctly rounded sqrt and division, never rsqrt.approx; no
    flush-to-zero. Needs the PTX embedded: TORCH_CUDA_ARCH_LIST="9.0+PTX" (CI's leg 2)."""
    cuobjdump = _cuobjdump()
    if cuobjdump is None:
        pytest.skip("cuobjdump not found (PATH, CUDA_HOME/bin, Triton's bundled tools)")
    library = _extension_library()
    proc = subprocess.run([cuobjdump, "-ptx", library], capture_output=True, text=True)
    if ".target sm_90" not in proc.stdout:
        pytest.skip(f"{library} embeds no sm_90 PTX (build with TORCH_CUDA_ARCH_LIST=\"9.0+PTX\" to "
                    "check it)")
    spellings = float_math(proc.stdout)
    print(f"\nspecial-function and .ftz instructions in the PTX of {library}: {spellings}")
    assert not inexact_math(proc.stdout), inexact_math(proc.stdout)
    # invstd of every dtype is sqrt.rn then a division (div.rn, or rcp.rn for 1 / x).
    assert {"sqrt.rn.f32", "sqrt.rn.f64", "div.rn.f32", "div.rn.f64"} <= set(spellings), spellings


def test_ptx_checks():
    """tests/ptx_checks.py on PTX spellings: every approximate or flush-to-zero form of the
    special functions is caught, the IEEE ones pass."""
    ptx = """
        sqrt.approx.ftz.f32 %f2, %f1;  sqrt.approx.f32 %f2, %f1;  rsqrt.approx.f32 %f3, %f2;
        rsqrt.approx.ftz.f64 %fd1, %fd2;  rcp.approx.ftz.f64 %fd1, %fd2;  div.full.f32 %f4, %f3, %f2;
        div.approx.ftz.f32 %f4, %f3, %f2;  ex2.approx.f32 %f1, %f2;  lg2.approx.ftz.f32 %f1, %f2;
        add.ftz.f32 %f1, %f2, %f3;  setp.gt.ftz.f32 %p1, %f1, %f2;  cvt.rn.ftz.f32.f16 %f1, %h1;
        sqrt.rn.f32 %f2, %f1;  div.rn.f32 %f4, %f3, %f2;  rcp.rn.f32 %f3, %f2;  sqrt.rn.f64 %fd2, %fd1;
        div.rn.f64 %fd1, %fd2, %fd3;  div.s32 %r1, %r2, %r3;  add.f32 %f1, %f2, %f3;
        call.uni __nv_fdiv_rn, (%f1);  // a comment mentioning sqrt and div
    """
    assert inexact_math(ptx) == sorted([
        "sqrt.approx.ftz.f32", "sqrt.approx.f32", "rsqrt.approx.f32", "rsqrt.approx.ftz.f64",
        "rcp.approx.ftz.f64", "div.full.f32", "div.approx.ftz.f32", "ex2.approx.f32", "lg2.approx.ftz.f32",
        "add.ftz.f32", "setp.gt.ftz.f32", "cvt.rn.ftz.f32.f16"])
    exact = set(float_math(ptx)) - set(inexact_math(ptx))
    assert exact == {"sqrt.rn.f32", "div.rn.f32", "rcp.rn.f32", "sqrt.rn.f64", "div.rn.f64", "div.s32"}
    assert is_inexact("rsqrt.rn.f32")  # no such IEEE form: rsqrt is refused whatever its modifiers


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
    sass = ("\t\tFunction : _Z1av\n  /*0090*/  STL.64 [R1], R6 ;\n  /*00a0*/  CALL.REL.NOINC 0x200 ;\n"
            "  /*00b0*/  LDL.LU.64 R46, [R1] ;\n  /*00c0*/  IMAD R17, R53, UR14, RZ ;\n"
            "  /*0100*/  @!P0 BRA 0xc0 ;\n  /*0110*/  EXIT ;\n"
            "\t\tFunction : _Z1bv\n  /*0010*/  STL [R1+0x4], R9 ;\n  /*0090*/  @P1 LDL R9, [R1+0x4] ;\n"
            "  /*00a0*/  BRA 0x10 ;\n")
    functions = split_sass(sass)
    assert sorted(functions) == ["_Z1av", "_Z1bv"]
    assert local_accesses_in_loops(functions["_Z1av"]) == 0  # saved at entry, reloaded before the loop
    assert local_accesses_in_loops(functions["_Z1bv"]) == 2
