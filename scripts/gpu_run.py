"""The first GPU run's driver: `bash scripts/gpu_check.sh [all|full|--plan]` runs this file.

It runs the steps of scripts/gpu_plan.py within one deadline and leaves results however it
ends. Each step is a child process (its own process group, in this session) with its output
appended to a log under $OUT as it runs; when it ends, one line goes to $OUT/status.txt:

    PASS    triton smoke tests           84.2 s  @   93 s  57 passed, 12 skipped in 80.1s
    FAIL    build                       300.0 s  @  308 s  timed out at its 300 s limit
        | [5/8] nvcc ... bn_backward.cu                       (its last lines)

(verdict, step, its time, the run's time when it ended, its key figures), written in one
write() each, so a kill at any moment leaves every finished step's line whole. The build
runs once, in the background from the start, in a copy of setup.py and csrc/ without
pyproject.toml (setuptools reads no project metadata then, so the image's setuptools builds it
whatever its version; the SPDX `license` string needs setuptools >= 77 only when pyproject.toml
is read). It is installed into fused_residual/ (by rename) only when it succeeded; the steps
that need it are SKIPPED otherwise, and every other step still runs, with the Triton backend.

Stub mode (GPU_CHECK_STUB=1) replaces each step's command by a shell stub
(gpu_steps.stub_command) that sleeps the step's estimate and prints its usual closing lines;
with GPU_CHECK_STUB_FAIL / GPU_CHECK_STUB_HANG (step names, comma-separated) a step fails, or
hangs ignoring SIGINT. GPU_CHECK_TIME_SCALE multiplies every time; GPU_CHECK_STUB_LEDGER names
a file each stub notes its step and command in. tests/test_gpu_check.py runs these.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gpu_plan
import gpu_steps

REPO = Path(__file__).resolve().parents[1]


class Run:
    def __init__(self, mode: str, out: Path, stub: bool, scale: float, deadline: float):
        self.steps = tuple(gpu_plan.scaled(s, scale) for s in gpu_plan.PLANS[mode])
        self.mode, self.out, self.stub, self.scale = mode, out, stub, scale
        self.deadline, self.margin = deadline * scale, gpu_plan.MARGIN_S * scale
        self.start = time.monotonic()
        self.work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
        self.install_dir = self.work / "installed" if stub else REPO / "fused_residual"
        self.active: dict[str, tuple[subprocess.Popen, float, float]] = {}  # name: (proc, int at, kill at)
        self.build: dict = {}  # the background build: proc, step, log offset, t0, limit, verdict
        self.skip: set[str] = set()
        self.counts = {"PASS": 0, "FAIL": 0, "SKIPPED": 0}
        out.mkdir(parents=True, exist_ok=True)
        for name in gpu_plan.OUT_FILES:
            (out / name).unlink(missing_ok=True)
        self.status_fd = os.open(out / "status.txt", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    # -- time and records ------------------------------------------------------------------

    def now(self) -> float:
        return time.monotonic() - self.start

    def write_status(self, text: str) -> None:
        os.write(self.status_fd, text.encode())
        sys.stdout.write(text)
        sys.stdout.flush()

    def record(
        self, verdict: str, name: str, figures: str, detail: list[str] = (), took: float = 0.0
    ) -> None:
        self.counts[verdict] += 1
        line = f"{verdict:<8}{name:<28}{took:7.1f} s  @{self.now():5.0f} s  {figures}".rstrip() + "\n"
        self.write_status(line + "".join(f"    | {d[:200]}\n" for d in detail))

    def log(self, name: str) -> Path:
        return self.out / name

    # -- processes ---------------------------------------------------------------------------

    def command(self, step: gpu_plan.Step) -> tuple[list[str], dict, Path, str]:
        """(what runs, environment additions, working directory, the command as logged)."""
        argv, env, cwd = gpu_steps.command(step.name, self.context())
        shown = " ".join(argv)
        if self.stub:
            return gpu_steps.stub_command(step.name, argv), env, cwd, f"(stub of) {shown}"
        return argv, env, cwd, shown

    def context(self) -> dict:
        """What a step's command needs; the extension first where it was built (the sanitizer
        loads its one library fast, Triton's kernel versions one by one)."""
        built = self.build.get("verdict") == "PASS"
        return dict(
            repo=REPO, out=self.out, work=self.work, backends=["extension", "triton"] if built else ["triton"]
        )

    def spawn(self, step: gpu_plan.Step, limit: float) -> tuple[subprocess.Popen, int]:
        argv, env, cwd, shown = self.command(step)
        path = self.log(step.log)
        with open(path, "a") as f:
            f.write(
                f"\n=== {step.name}: limit {limit:.1f} s, at {self.now():.1f} s of the run "
                f"({time.strftime('%H:%M:%S', time.gmtime())} UTC)\n$ {shown}\n"
            )
        offset = path.stat().st_size
        with open(path, "a") as f:
            proc = subprocess.Popen(
                argv,
                stdout=f,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=cwd,
                env={**os.environ, **env},
                process_group=0,
            )
        t = self.now()
        self.active[step.name] = (proc, t + limit, t + limit + step.grace)
        return proc, offset

    def pump(self) -> None:
        """Interrupt or kill whatever passed its limit; record the build when it ends."""
        t = self.now()
        for proc, interrupt_at, kill_at in list(self.active.values()):
            if proc.poll() is not None:
                continue
            if t >= kill_at:
                _signal_group(proc, signal.SIGKILL)
            elif t >= interrupt_at and not getattr(proc, "interrupted", False):
                proc.interrupted = True
                _signal_group(proc, signal.SIGINT)
        if (
            self.build.get("proc") is not None
            and self.build["proc"].poll() is not None
            and "verdict" not in self.build
        ):
            self.finish_build()

    def wait(self, proc: subprocess.Popen) -> int:
        while proc.poll() is None:
            self.pump()
            time.sleep(0.02)
        self.pump()
        return proc.returncode

    # -- steps -------------------------------------------------------------------------------

    def run_step(self, index: int) -> None:
        step = self.steps[index]
        if step.needs_extension and self.build.get("verdict") != "PASS":
            self.skip.add(step.name)
            self.record("SKIPPED", step.name, f"needs the extension: the build {self.build_outcome()}")
            return
        unavailable = gpu_steps.unavailable(step.name, self.stub)
        if unavailable:
            self.skip.add(step.name)
            self.record("SKIPPED", step.name, unavailable)
            return
        limit = gpu_plan.step_limit(
            self.steps, index, self.now(), self.deadline, self.margin, frozenset(self.skip)
        )
        least = gpu_plan.MIN_BENCH_S * self.scale if math.isinf(step.cap) else step.floor / 3
        if limit < least:
            self.skip.add(step.name)
            self.record("SKIPPED", step.name, f"no time left ({max(limit, 0):.1f} s to its limit)")
            return
        t0 = self.now()
        proc, offset = self.spawn(step, limit)
        if step.background:
            self.build = dict(proc=proc, step=step, offset=offset, t0=t0, limit=limit)
            return
        rc = self.wait(proc)
        self.active.pop(step.name, None)
        self.record(*self.judge(step, rc, proc, offset, limit), took=self.now() - t0)

    def judge(self, step, rc: int, proc, offset: int, limit: float) -> tuple[str, str, str, list[str]]:
        """(verdict, step name, key figures, detail lines) of a step that ended with `rc`."""
        text = _read_from(self.log(step.log), offset)
        figures, failed = gpu_steps.figures(step.name, text, self.out)
        verdict = "PASS" if rc == 0 and not failed else "FAIL"
        if getattr(proc, "interrupted", False):
            figures = f"cut at its {limit:.1f} s limit; {figures}"
        elif rc != 0:
            figures = f"exit {rc}; {figures}"
        detail = [line for line in text.splitlines() if line.strip()][-8:] if verdict == "FAIL" else []
        return verdict, step.name, figures, detail

    def finish_build(self) -> None:
        """Record the build once it ended: installed into fused_residual/ when it passed."""
        b = self.build
        self.active.pop(b["step"].name, None)
        verdict, name, figures, detail = self.judge(
            b["step"], b["proc"].returncode, b["proc"], b["offset"], b["limit"]
        )
        if verdict == "PASS":
            installed = gpu_steps.install_build(self.work, self.install_dir)
            figures += f"; installed {', '.join(installed)}" if installed else "; built no _C library"
            verdict = "PASS" if installed else "FAIL"
        b["verdict"] = verdict
        self.record(verdict, name, figures, detail, took=self.now() - b["t0"])

    def build_outcome(self) -> str:
        if not self.build:
            return "did not run"
        return "passed" if self.build.get("verdict") == "PASS" else "failed (see build.log)"

    def wait_for_build(self) -> None:
        if self.build.get("proc") is not None:
            self.wait(self.build["proc"])

    def execute(self) -> int:
        self.write_status(
            f"# gpu_check {self.mode}: {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC, "
            f"deadline {self.deadline:.0f} s{', STUB (no GPU)' if self.stub else ''}; "
            f"files in {self.out}\n"
        )
        wait = gpu_plan.wait_index(self.steps)
        for i in range(len(self.steps)):
            if i == wait:
                self.wait_for_build()
            self.run_step(i)
        self.wait_for_build()
        c = self.counts
        self.write_status(
            f"# end at {self.now():.0f} s: {c['PASS']} PASS, {c['FAIL']} FAIL, {c['SKIPPED']} SKIPPED\n"
        )
        shutil.rmtree(self.work, ignore_errors=True)
        return 1 if c["FAIL"] else 0

    def on_signal(self, signum, frame) -> None:
        for proc, _, _ in self.active.values():
            _signal_group(proc, signal.SIGKILL)
        self.write_status(f"# stopped by signal {signum} at {self.now():.0f} s\n")
        os._exit(128 + signum)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _read_from(path: Path, offset: int) -> str:
    try:
        with open(path, errors="replace") as f:
            f.seek(offset)
            return f.read()
    except FileNotFoundError:
        return ""


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", nargs="?", default="all", choices=sorted(gpu_plan.PLANS))
    parser.add_argument("--plan", action="store_true", help="print the plan and its times, run nothing")
    parser.add_argument("--preflight", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.preflight:
        return gpu_steps.preflight()
    scale = float(os.environ.get("GPU_CHECK_TIME_SCALE", "1"))
    deadline = float(os.environ.get("GPU_CHECK_DEADLINE_S", gpu_plan.DEADLINE_S))
    if args.plan:
        print(gpu_plan.describe(gpu_plan.PLANS[args.mode], deadline, gpu_plan.MARGIN_S))
        return 0
    out = Path(os.environ.get("OUT") or REPO / "gpu_check_out")
    run = Run(args.mode, out, os.environ.get("GPU_CHECK_STUB", "0") == "1", scale, deadline)
    signal.signal(signal.SIGTERM, run.on_signal)
    signal.signal(signal.SIGINT, run.on_signal)
    return run.execute()


if __name__ == "__main__":
    sys.exit(main())
