"""The first GPU run's control flow, proven without a GPU (issue 19): scripts/gpu_check.sh in
stub mode (GPU_CHECK_STUB=1: each step a shell stub that sleeps its estimate and prints its
usual closing lines), with every time scaled down 100x, so a whole run takes a few seconds.

What must hold however the run goes: a failed build, a timed-out build and a kill at any
moment each leave a status file that is correct and complete so far (a whole line for every
step that ended, nothing for steps that did not); the extension is built once; the steps that
do not need it still run, with the Triton backend only; the default plan fits one 600 s
device command; and the step commands exist and run here where they can (pytest's Triton
smoke selection collects, sanitizer_cases.py and gpu_checks.py run on the CPU).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import gpu_plan  # noqa: E402
import gpu_steps  # noqa: E402

SCALE = 0.01
LINE = re.compile(r"^(PASS|FAIL|SKIPPED) {1,4}(\S.*?) +(\d+\.\d) s  @ *(\d+) s(?:  (.*))?$")
STEPS = [s.name for s in gpu_plan.ALL]


def stub_env(tmp_path: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    env.update(
        OUT=str(tmp_path / "out"),
        PYTHON=sys.executable,
        GPU_CHECK_STUB="1",
        GPU_CHECK_TIME_SCALE=str(SCALE),
        GPU_CHECK_STUB_PACE="0.3",
        GPU_CHECK_STUB_LEDGER=str(tmp_path / "ledger"),
        **extra,
    )
    return env


def run_stub(tmp_path: Path, **extra: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh")],
        env=stub_env(tmp_path, **extra),
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc, time.monotonic() - start


def parse_status(tmp_path: Path) -> tuple[dict[str, tuple[str, str, list[str]]], list[str]]:
    """{step: (verdict, figures, detail lines)} and the '#' lines; fails on any line that is
    not whole and well formed, and on a step reported twice."""
    text = (tmp_path / "out" / "status.txt").read_text()
    assert text.endswith("\n"), "a partial last line"
    steps: dict[str, tuple[str, str, list[str]]] = {}
    comments, last = [], None
    for line in text.splitlines():
        if line.startswith("# "):
            comments.append(line)
        elif line.startswith("    | "):
            assert last is not None, line
            steps[last][2].append(line[6:])
        else:
            m = LINE.match(line)
            assert m, f"malformed status line: {line!r}"
            verdict, name, _, _, figures = m.groups()
            assert name in STEPS and name not in steps, line
            steps[name] = (verdict, figures or "", [])
            last = name
    return steps, comments


def ledger(tmp_path: Path) -> list[tuple[str, str]]:
    path = tmp_path / "ledger"
    return [tuple(line.split("\t", 1)) for line in path.read_text().splitlines()] if path.exists() else []


def started(entries, step: str) -> list[str]:
    return [what for name, what in entries if name == step and what.startswith("start")]


def test_default_plan_fits_one_device_command():
    rows = gpu_plan.timeline(gpu_plan.ALL, gpu_plan.DEADLINE_S, gpu_plan.MARGIN_S)
    worst = gpu_plan.timeline(gpu_plan.ALL, gpu_plan.DEADLINE_S, gpu_plan.MARGIN_S, worst=True)
    assert [r[0] for r in rows] == STEPS
    assert max(end for _, _, end in rows) <= gpu_plan.DEADLINE_S - gpu_plan.MARGIN_S
    assert max(end for _, _, end in worst) <= gpu_plan.DEADLINE_S <= gpu_plan.COMMAND_LIMIT_S - 30
    preflight = gpu_plan.ALL[0]
    assert preflight.name == "preflight" and preflight.cap + preflight.grace <= 15
    # The order: preflight, Triton tests beside the build, then the extension's check,
    # the sanitizers, the reference comparisons, graphs, torch.compile, benchmarks last.
    assert STEPS == [
        "preflight",
        "build",
        "triton smoke tests",
        "extension on cuda",
        "sanitizer memcheck",
        "sanitizer racecheck",
        "sanitizer initcheck",
        "fp32 reference",
        "cuda graph capture",
        "torch.compile triton step",
        "benchmarks",
    ]
    # Every step but the benchmarks gets its estimate in the plan; the benchmarks the rest.
    for step, (_, start, end) in zip(gpu_plan.ALL[:-1], rows[:-1], strict=True):
        assert end - start == pytest.approx(step.estimate), step
    assert rows[-1][2] - rows[-1][1] >= 60
    out = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), "--plan"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and "within the 600 s command" in out.stdout, out.stdout + out.stderr


def test_stub_run_passes_every_step_and_builds_once(tmp_path):
    proc, _ = run_stub(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps, comments = parse_status(tmp_path)
    assert list(steps) == ["preflight", "triton smoke tests", "build", *STEPS[3:]] or set(steps) == set(STEPS)
    assert all(verdict == "PASS" for verdict, _, _ in steps.values()), steps
    assert "installed _build_info.py, _C.stub.so" in steps["build"][1]
    assert comments[-1].startswith("# end at") and "11 PASS, 0 FAIL, 0 SKIPPED" in comments[-1]
    entries = ledger(tmp_path)
    assert len(started(entries, "build")) == 1
    # The Triton tests start before the build ends, and no step that needs it starts before.
    order = [f"{name} {what.split()[0]}" for name, what in entries]
    assert order.index("triton smoke tests start") < order.index("build done")
    assert order.index("build done") < order.index("extension on cuda start")
    for name in ("sanitizer memcheck", "fp32 reference", "cuda graph capture"):
        assert started(entries, name)[0].endswith("--backends extension triton"), name
    # At most the 8 files a device call returns, none in a folder, figures per benchmark case.
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert set(files) <= set(gpu_plan.OUT_FILES) and len(files) <= 8, files
    assert json.loads((tmp_path / "out" / "bench_cases.jsonl").read_text().splitlines()[0])["name"]


@pytest.mark.parametrize("how", ["fails", "times out"])
def test_build_failure_leaves_every_other_step_running(tmp_path, how):
    proc, elapsed = run_stub(
        tmp_path, **{"GPU_CHECK_STUB_FAIL" if how == "fails" else "GPU_CHECK_STUB_HANG": "build"}
    )
    assert proc.returncode == 1
    steps, comments = parse_status(tmp_path)
    verdict, figures, detail = steps["build"]
    assert verdict == "FAIL"
    if how == "fails":
        assert figures.startswith("exit 1") and detail[-1] == "error: the stub's last line", steps["build"]
    else:  # cut at its limit (300 s x SCALE), then killed after its grace: it ignores SIGINT
        assert figures.startswith("cut at its 3.0 s limit") and detail[-1] == "stub: hanging", steps["build"]
        assert elapsed < 3.0 + 10 * SCALE + 6.0  # the build's limit and grace, then the other steps
    assert (
        steps["extension on cuda"][0] == "SKIPPED" and "needs the extension" in steps["extension on cuda"][1]
    )
    for name in STEPS:
        if name not in ("build", "extension on cuda"):
            assert steps[name][0] == "PASS", (name, steps[name])
    entries = ledger(tmp_path)
    assert len(started(entries, "build")) == 1, entries  # never built again
    for name in (
        "sanitizer memcheck",
        "sanitizer racecheck",
        "sanitizer initcheck",
        "fp32 reference",
        "cuda graph capture",
    ):
        assert started(entries, name)[0].endswith("--backends triton"), name
    assert comments[-1].startswith("# end at") and "9 PASS, 1 FAIL, 1 SKIPPED" in comments[-1]


def test_every_step_hanging_still_ends_by_the_deadline(tmp_path):
    """Each step cut at its limit, or skipped once too little time is left for it (at this
    scale the processes' own start and kill, unscaled, eat into the floors), and the run over
    by its deadline."""
    proc, elapsed = run_stub(tmp_path, GPU_CHECK_STUB_HANG=",".join(STEPS))
    assert proc.returncode == 1
    steps, comments = parse_status(tmp_path)
    assert set(steps) == set(STEPS), steps
    for name, (verdict, figures, _) in steps.items():
        cut = verdict == "FAIL" and figures.startswith("cut at its")
        skipped = verdict == "SKIPPED" and figures.startswith(("no time left", "needs the extension"))
        assert cut or skipped, (name, verdict, figures)
    assert sum(v == "FAIL" for v, _, _ in steps.values()) >= 6
    assert elapsed <= gpu_plan.DEADLINE_S * SCALE + 2.0, elapsed
    assert comments[-1].startswith("# end at")


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_killed_at_a_random_moment_leaves_a_correct_status(tmp_path, seed):
    """SIGKILL of the whole process group (what a device command's time limit does) at a
    random moment: every step reported has ended (in the stubs' ledger), with one whole line;
    the build started at most once. SIGTERM: the same, and a closing line."""
    moment = random.Random(seed).uniform(0.0, 4.0)
    sig = signal.SIGTERM if seed == 4 else signal.SIGKILL
    proc = subprocess.Popen(
        ["bash", str(REPO / "scripts" / "gpu_check.sh")],
        env=stub_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    time.sleep(moment)
    os.killpg(proc.pid, sig) if sig == signal.SIGKILL else proc.send_signal(sig)
    proc.wait(timeout=30)
    if not (tmp_path / "out" / "status.txt").exists():
        return  # killed before the run began: nothing to leave
    steps, comments = parse_status(tmp_path)
    entries = ledger(tmp_path)
    ended = {name for name, what in entries if what in ("done", "failed")}
    for name, (verdict, _, _) in steps.items():
        assert verdict == "SKIPPED" or name in ended, (name, moment, entries)
    assert len(started(entries, "build")) <= 1
    assert comments[0].startswith("# gpu_check all:")
    if sig == signal.SIGTERM and proc.returncode == 128 + signal.SIGTERM:
        assert comments[-1].startswith("# stopped by signal 15"), comments


def test_figures_from_step_output():
    out = Path("/nonexistent")
    assert gpu_steps.figures("triton smoke tests", "x\n==== 57 passed, 12 skipped in 80.10s ====\n", out) == (
        "57 passed, 12 skipped in 80.10s",
        False,
    )
    assert gpu_steps.figures("triton smoke tests", "1 failed, 56 passed in 80.10s\n", out)[1]
    assert gpu_steps.figures("triton smoke tests", "Traceback ...\n", out) == ("no pytest summary", True)
    ok = "sanitizer cases done: triton 36/36\n========= ERROR SUMMARY: 0 errors\n"
    assert gpu_steps.figures("sanitizer memcheck", ok, out) == (
        "0 errors; sanitizer cases done: triton 36/36",
        False,
    )
    assert gpu_steps.figures("sanitizer memcheck", ok.replace(": 0 errors", ": 2 errors"), out)[1]
    race = "========= RACECHECK SUMMARY: 3 hazards displayed (1 error, 2 warnings)\n"
    assert gpu_steps.figures("sanitizer racecheck", race, out)[1]
    assert gpu_steps.figures("sanitizer initcheck", "cases not finished\n", out)[1]  # no summary
    assert gpu_steps.figures(
        "fp32 reference", "RESULT reference: fp32 triton: worst 0.5 of bound\n", out
    ) == ("reference: fp32 triton: worst 0.5 of bound", False)
    assert gpu_steps.figures("torch.compile triton step", "RESULT compile: ... | FAIL\n", out)[1]
    assert gpu_steps.figures("build", "[7/8] nvcc a.cu\n[8/8] c++ -shared\n", out) == (
        "ninja 8/8 steps",
        False,
    )


def test_install_build_renames_info_then_library(tmp_path):
    built = tmp_path / "work" / "lib" / "fused_residual"
    built.mkdir(parents=True)
    (built / "_C.cpython-312-x86_64-linux-gnu.so").write_text("lib")
    (built / "_build_info.py").write_text("info")
    target = tmp_path / "pkg"
    assert gpu_steps.install_build(tmp_path / "work", target) == [
        "_build_info.py",
        "_C.cpython-312-x86_64-linux-gnu.so",
    ]
    assert sorted(p.name for p in target.iterdir()) == [
        "_C.cpython-312-x86_64-linux-gnu.so",
        "_build_info.py",
    ]
    assert gpu_steps.install_build(tmp_path / "nothing", target) == []


def test_build_stage_has_no_pyproject(tmp_path):
    """The build runs in a copy of setup.py and csrc/ without pyproject.toml: setuptools then
    reads no [project] table (whose SPDX license string needs setuptools >= 77)."""
    argv, env, cwd = gpu_steps.command("build", dict(repo=REPO, out=tmp_path, work=tmp_path, backends=[]))
    assert argv[1:3] == ["setup.py", "build_ext"] and "--inplace" not in argv
    assert (cwd / "setup.py").exists() and (cwd / "csrc" / "ops.cpp").exists()
    assert not (cwd / "pyproject.toml").exists() and env["TORCH_CUDA_ARCH_LIST"]


def test_triton_smoke_selection_collects_triton_tests_only():
    argv, env, cwd = gpu_steps.command(
        "triton smoke tests", dict(repo=REPO, out=REPO, work=REPO, backends=[])
    )
    proc = subprocess.run(
        [sys.executable, *argv[1:], "--collect-only"],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    assert proc.returncode == 0 and ids, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert all("triton" in i for i in ids), [i for i in ids if "triton" not in i]


def _cpu_backends() -> list[str]:
    import fused_residual

    return [b for b in fused_residual.available_backends("cpu") if b != "reference"]


def _run_script(*argv: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")}
    proc = subprocess.run(
        [sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_sanitizer_cases_run_on_cpu():
    """The sanitizer's cases (the first three per fused backend: every dtype, both layouts, at
    C % 8 != 0 and odd H*W) on the CPU kernels and Triton's interpreter."""
    backends = _cpu_backends()
    if not backends:
        pytest.skip("no fused backend runs CPU tensors here")
    out = _run_script(
        "scripts/sanitizer_cases.py", "--device", "cpu", "--cases", "3", "--backends", *backends
    )
    for backend in backends:
        assert f"sanitizer cases done: {backend} 3/36" in out, out


def test_gpu_checks_run_on_cpu():
    """scripts/gpu_checks.py's extension and reference checks on the CPU (graph capture and
    torch.compile of the Triton backend need a GPU)."""
    backends = _cpu_backends()
    if not backends:
        pytest.skip("no fused backend runs CPU tensors here")
    out = _run_script(
        "scripts/gpu_checks.py", "reference", "--device", "cpu", "--quick", "--backends", *backends
    )
    line = [ln for ln in out.splitlines() if ln.startswith("RESULT reference: fp32")]
    assert line and "FAIL" not in line[0] and all(f"{b}: worst" in line[0] for b in backends), out[-2000:]
    if "extension" in backends:
        out = _run_script("scripts/gpu_checks.py", "extension", "--device", "cpu")
        assert "RESULT extension: available_backends('cpu')" in out and "FAIL" not in out, out
