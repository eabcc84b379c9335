"""The steps of the first GPU run (scripts/gpu_plan.py orders and times them, gpu_run.py runs
them): each one's command, its key figures read back from its log, the preflight, the build's
staging and install, and the stub that stands in for a step on a machine without a GPU.

Standard library only: the driver must run even where torch does not import.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import gpu_plan

PYTHON = os.environ.get("PYTHON", "python3")
# A test module that fails to import (a package missing on the GPU image) must not stop the others.
PYTEST = [PYTHON, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--continue-on-collection-errors"]
BENCH_FILES = [
    "benchmarks/test_tail_bench.py",
    "benchmarks/test_block_bench.py",
    "benchmarks/test_model_bench.py",
]  # the tail first: its figures matter most
SANITIZERS = {
    "sanitizer memcheck": "memcheck",
    "sanitizer racecheck": "racecheck",
    "sanitizer initcheck": "initcheck",
}
CHECKS = {
    "extension on cuda": "extension",
    "fp32 reference": "reference",
    "cuda graph capture": "graph",
    "torch.compile triton step": "compile",
}


def find_tool(name: str) -> str | None:
    """`name` on PATH, else in CUDA_HOME/bin or /usr/local/cuda/bin."""
    for candidate in (
        shutil.which(name),
        *(
            os.path.join(home, "bin", name)
            for home in (os.environ.get("CUDA_HOME", ""), "/usr/local/cuda")
            if home
        ),
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def command(name: str, ctx: dict) -> tuple[list[str], dict, Path]:
    """(argv, environment additions, working directory) of step `name`."""
    repo, out, backends = ctx["repo"], ctx["out"], ctx["backends"]
    env = {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])),
        "PYTHONUNBUFFERED": "1",
    }
    script = str(Path(__file__).resolve().parent / "gpu_run.py")
    if name == "preflight":
        return [PYTHON, script, "--preflight"], env, repo
    if name == "build":
        src = stage_build(repo, ctx["work"])
        env.update(
            TORCH_CUDA_ARCH_LIST=os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"),
            MAX_JOBS=os.environ.get("MAX_JOBS", str(os.cpu_count() or 1)),
        )
        return (
            [
                PYTHON,
                "setup.py",
                "build_ext",
                "--build-lib",
                str(ctx["work"] / "lib"),
                "--build-temp",
                str(ctx["work"] / "tmp"),
            ],
            env,
            src,
        )
    if name == "triton smoke tests":
        return [*PYTEST, "-m", "smoke", "-k", "triton", "tests/"], env, repo
    if name == "full test suite":
        return [*PYTEST, "tests/"], env, repo
    if name in SANITIZERS:
        env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"  # every tensor its own allocation: overruns show
        tool = find_tool("compute-sanitizer") or "compute-sanitizer"
        return (
            [
                tool,
                "--tool",
                SANITIZERS[name],
                "--error-exitcode",
                "3",
                PYTHON,
                "scripts/sanitizer_cases.py",
                "--backends",
                *backends,
            ],
            env,
            repo,
        )
    if name in CHECKS:
        return [PYTHON, "scripts/gpu_checks.py", CHECKS[name], "--backends", *backends], env, repo
    if name == "benchmarks":
        env["PYTHONPATH"] += os.pathsep + str(repo / "scripts")
        env["GPU_CHECK_BENCH_CASES"] = str(out / "bench_cases.jsonl")
        return (
            [
                *PYTEST,
                "-p",
                "bench_cases",
                *BENCH_FILES,
                "--benchmark-only",
                f"--benchmark-json={out / 'gpu.json'}",
            ],
            env,
            repo,
        )
    raise ValueError(f"unknown step {name!r}")


def unavailable(name: str, stub: bool) -> str | None:
    """Why step `name` cannot run on this machine, or None."""
    if name in SANITIZERS and not stub and find_tool("compute-sanitizer") is None:
        return "compute-sanitizer not found (PATH, CUDA_HOME/bin, /usr/local/cuda/bin)"
    return None


# -- the build -------------------------------------------------------------------------------


def stage_build(repo: Path, work: Path) -> Path:
    """A copy of setup.py and csrc/ to build from: no pyproject.toml there, so setuptools reads
    no project metadata (any version builds; the SPDX license string needs >= 77), and the
    tree's fused_residual/ changes only when install_build renames a finished build into it."""
    src = work / "src"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    shutil.copy2(repo / "setup.py", src / "setup.py")
    shutil.copytree(repo / "csrc", src / "csrc")
    return src


def install_build(work: Path, install_dir: Path) -> list[str]:
    """Move the built library and its _build_info.py into `install_dir`, each by a rename (a
    process importing fused_residual meanwhile sees the old state or the new one), the info
    first; the names installed (none when the build left no library)."""
    built = work / "lib" / "fused_residual"
    libraries = sorted(built.glob("_C*.so")) if built.is_dir() else []
    if not libraries:
        return []
    install_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for path in [*sorted(built.glob("_build_info.py")), *libraries]:
        tmp = install_dir / f".{path.name}.tmp"
        shutil.copy2(path, tmp)
        os.replace(tmp, install_dir / path.name)
        names.append(path.name)
    return names


# -- key figures -------------------------------------------------------------------------------

_PYTEST_SUMMARY = re.compile(r"^=*\s*((?:\d+ \w+(?:, )?)+ in [\d.]+s.*?)\s*=*$", re.M)


def figures(name: str, text: str, out: Path) -> tuple[str, bool]:
    """(key figures, failed) of step `name` from the output it appended to its log."""
    if name == "build":
        steps = re.findall(r"^\[(\d+)/(\d+)\]", text, re.M)
        arch = re.findall(r"CUDA kernels for architectures (\S+)", text)
        return (f"ninja {steps[-1][0]}/{steps[-1][1]} steps" if steps else "no ninja steps") + (
            f", CUDA archs {arch[-1]}" if arch else ""
        ), False
    results = [line[len("RESULT ") :] for line in text.splitlines() if line.startswith("RESULT ")]
    if name == "preflight" or name in CHECKS:
        failed = not results or any("FAIL" in r for r in results)
        return ("; ".join(results) or "no RESULT line"), failed
    if name in SANITIZERS:
        errors = [int(n) for n in re.findall(r"ERROR SUMMARY: (\d+) error", text)]
        errors += [
            int(n) for n in re.findall(r"RACECHECK SUMMARY: \d+ hazards? displayed \((\d+) error", text)
        ]
        cases = re.findall(r"^sanitizer cases done: .*$", text, re.M)
        found = f"{sum(errors)} errors" if errors else "no sanitizer summary"
        return f"{found}; {'; '.join(cases) or 'cases not finished'}", not errors or sum(errors) > 0
    summary = _PYTEST_SUMMARY.findall(text)
    found = summary[-1] if summary else "no pytest summary"
    failed = not summary or bool(re.search(r"\d+ (failed|errors?)\b", found))
    if name == "benchmarks":
        path = out / "bench_cases.jsonl"
        n = sum(1 for _ in open(path)) if path.exists() else 0
        found = f"{n} cases in bench_cases.jsonl; {found}"
    return found, failed


# -- preflight ---------------------------------------------------------------------------------

_VERSIONS = (
    "import sys, torch, triton, setuptools; print('python', sys.version.split()[0], '| torch', "
    "torch.__version__, '(CUDA', str(torch.version.cuda) + ', GPU visible:', torch.cuda.is_available(),"
    " end=') | '); print('triton', triton.__version__, '| setuptools', setuptools.__version__)"
)


def preflight(timeout: float = 9.0) -> int:
    """One line: GPU, driver, python, torch, triton, setuptools, nvcc, ninja and
    compute-sanitizer versions, the queries run at once and each cut at `timeout` s."""
    queries = {
        "gpu": ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
        "python": [PYTHON, "-c", _VERSIONS],
        "nvcc": [find_tool("nvcc") or "nvcc", "--version"],
        "ninja": [shutil.which("ninja") or "ninja", "--version"],
        "compute-sanitizer": [find_tool("compute-sanitizer") or "compute-sanitizer", "--version"],
    }
    procs = {}
    for key, argv in queries.items():
        try:
            procs[key] = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        except OSError as exc:
            procs[key] = exc
    end = time.monotonic() + timeout
    found = {}
    for key, proc in procs.items():
        if isinstance(proc, OSError):
            found[key] = f"not found ({proc.strerror})"
            continue
        try:
            text, _ = proc.communicate(timeout=max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            found[key] = f"no answer in {timeout:.0f} s"
            continue
        print(f"--- {' '.join(queries[key])} (exit {proc.returncode})\n{text.strip()}")
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        if key == "nvcc":
            lines = [ln for ln in lines if "release" in ln] or lines
        if key == "compute-sanitizer":
            lines = [ln for ln in lines if "Version" in ln] or lines
        found[key] = (
            (lines[-1] if lines else "") if proc.returncode == 0 else f"failed: {(lines or ['?'])[-1]}"
        )
    ok = (
        not found["gpu"].startswith(("failed", "not found", "no answer"))
        and "GPU visible: True" in found["python"]
    )
    print(
        f"RESULT GPU {found['gpu']} | {found['python']} | nvcc {found['nvcc']} | ninja {found['ninja']} | "
        f"compute-sanitizer {found['compute-sanitizer']}{'' if ok else ' | FAIL: no usable GPU'}"
    )
    return 0 if ok else 1


# -- stub mode ---------------------------------------------------------------------------------


def _stub_output(name: str, argv: list[str]) -> tuple[str, list[str]]:
    """(closing lines, shell commands for its side effects) of the stub of step `name`."""
    backends = " ".join(argv[argv.index("--backends") + 1 :]) if "--backends" in argv else ""
    if name == "preflight":
        return "RESULT GPU stub | python stub | nvcc stub | ninja stub | compute-sanitizer stub", []
    if name == "build":
        lib = Path(argv[argv.index("--build-lib") + 1]) / "fused_residual"
        return (
            "fused_residual build: CUDA kernels for architectures 9.0 (stub)\n[1/1] stub compile",
            [
                f"mkdir -p {shlex.quote(str(lib))}",
                f"echo 'CUDA_KERNELS = True  # stub' > {shlex.quote(str(lib / '_build_info.py'))}",
                f"echo stub > {shlex.quote(str(lib / '_C.stub.so'))}",
            ],
        )
    if name in SANITIZERS:
        summary = (
            "RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)"
            if "racecheck" in name
            else "ERROR SUMMARY: 0 errors"
        )
        return f"sanitizer cases done: {backends} (stub)\n========= {summary}", []
    if name in CHECKS:
        return f"RESULT {CHECKS[name]}: stub, backends {backends}", []
    effects = []
    if name == "benchmarks":
        case = json.dumps({"name": "stub case", "median_s": 1e-3})
        effects = [f'echo {shlex.quote(case)} >> "$GPU_CHECK_BENCH_CASES"']
    return "..\n2 passed in 0.01s", effects


def stub_command(name: str, argv: list[str]) -> list[str]:
    """A shell command standing in for step `name`, whose real command is `argv`: it notes its
    start in $GPU_CHECK_STUB_LEDGER, sleeps the step's estimate x GPU_CHECK_TIME_SCALE x
    GPU_CHECK_STUB_PACE, then prints the step's usual closing lines. A step named in
    GPU_CHECK_STUB_FAIL fails instead; one in GPU_CHECK_STUB_HANG hangs, deaf to SIGINT, so
    that only the SIGKILL after its grace ends it. A shell starts in milliseconds, so the stub
    tests can scale the plan down to seconds."""
    estimate = next(s.estimate for plan in gpu_plan.PLANS.values() for s in plan if s.name == name)
    pace = float(os.environ.get("GPU_CHECK_TIME_SCALE", "1")) * float(
        os.environ.get("GPU_CHECK_STUB_PACE", "1")
    )
    closing, effects = _stub_output(name, argv)
    q = shlex.quote
    ledger = '"$GPU_CHECK_STUB_LEDGER"'
    note = f'[ -z "${{GPU_CHECK_STUB_LEDGER:-}}" ] || printf "%s\\t%s\\n" {q(name)} "$1" >> {ledger}'
    if name in os.environ.get("GPU_CHECK_STUB_HANG", "").split(","):
        body = ["trap '' INT", "echo 'stub: hanging'", "while :; do sleep 1; done"]
    elif name in os.environ.get("GPU_CHECK_STUB_FAIL", "").split(","):
        body = [
            f"sleep {estimate * pace:.3f}",
            f"echo {q(f'stub: {name} fails')}",
            'echo "error: the stub\'s second-to-last line"',
            'echo "error: the stub\'s last line"',
            "set -- failed",
            note,
            "exit 1",
        ]
    else:
        body = [f"sleep {estimate * pace:.3f}", *effects, f"printf '%s\\n' {q(closing)}", "set -- done", note]
    script = "\n".join(
        [f"set -- {q('start ' + ' '.join(argv))}", note, f"echo {q('stub of: ' + ' '.join(argv))}", *body]
    )
    return ["sh", "-c", script]


if __name__ == "__main__":
    sys.exit("run scripts/gpu_run.py (or bash scripts/gpu_check.sh)")
