"""What the first GPU run does, in order, and how long each step may take (scripts/gpu_run.py
runs it; `bash scripts/gpu_check.sh --plan` prints it).

The run has one deadline (DEADLINE_S: one 600 s device command less a margin). Each step has
a cap (the most it may ever take), a floor (seconds held back for it while earlier steps run)
and an estimate (its expected time on the H200 machine: 16 cores, torch 2.11 + triton 3.6;
not measured there yet, the first run's status.txt replaces them). A step's limit is computed
when it starts, from the time left:

    limit = min(cap, time to the deadline - floors of the steps still to come - grace - margin)

so a slow early step eats into later steps' spare time but never into their floors, and the
last step (benchmarks, no cap) gets whatever is left. The build runs in the background from
the start, beside the Triton tests, which need no extension; the steps that need it wait for
it. Order (issue 19): preflight; Triton smoke tests; build time, available_backends("cuda")
and one CUDA op call; compute-sanitizer memcheck, racecheck, initcheck; fp32 reference
comparisons of both backends; CUDA-graph capture; torch.compile(fullgraph=True) of a
Triton-backend training step; benchmarks.

Estimates: the build ~150 s (its slowest file, bn_backward.cu, ~105 s on one core, then the
link; 16 cores compile the 8 sources at once); the Triton smoke tests ~90 s (start 5 s, the
JIT of ~110 kernel versions x ~0.2 s, a torch.compile block step ~30 s); a sanitizer
pass ~30-60 s (Python, CUDA and the tool start ~15 s, then the cases, 10-100x slower under
the tool, memcheck the slowest); the checks ~10-25 s each, torch.compile of a forward +
backward ~60 s (Inductor's first compile on a cold cache).
"""

from __future__ import annotations

import dataclasses
import math

DEADLINE_S = 550.0  # one device command is at most 600 s; 50 s to spare (start-up, slack)
COMMAND_LIMIT_S = 600.0
GRACE_S = 10.0  # SIGINT, then SIGKILL this much later (pytest writes its summary and JSON)
MARGIN_S = 5.0  # held back after the last step for the closing lines
MIN_BENCH_S = 30.0  # fewer seconds than this left: the benchmarks are skipped

# The files the run leaves in $OUT (the device machine returns at most 8).
OUT_FILES = (
    "status.txt",
    "build.log",
    "tests.log",
    "sanitizer.txt",
    "checks.log",
    "bench.log",
    "bench_cases.jsonl",
    "gpu.json",
)


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    log: str  # the file in $OUT its output is appended to
    cap: float
    floor: float
    estimate: float
    needs_extension: bool = False  # SKIPPED when the build failed
    after_build: bool = False  # waits for the build to end (so does a step that needs it)
    background: bool = False  # started at once; the first step that needs it waits for it
    grace: float = GRACE_S  # from its SIGINT to its SIGKILL


ALL = (
    Step("preflight", "checks.log", cap=12, floor=15, estimate=8, grace=3),
    Step("build", "build.log", cap=300, floor=0, estimate=150, background=True),
    Step("triton smoke tests", "tests.log", cap=180, floor=60, estimate=90),
    Step("extension on cuda", "checks.log", cap=60, floor=20, estimate=15, needs_extension=True),
    Step("sanitizer memcheck", "sanitizer.txt", cap=120, floor=40, estimate=60),
    Step("sanitizer racecheck", "sanitizer.txt", cap=90, floor=30, estimate=45),
    Step("sanitizer initcheck", "sanitizer.txt", cap=90, floor=30, estimate=45),
    Step("fp32 reference", "checks.log", cap=60, floor=20, estimate=25),
    Step("cuda graph capture", "checks.log", cap=45, floor=15, estimate=10),
    Step("torch.compile triton step", "checks.log", cap=120, floor=45, estimate=60),
    Step("benchmarks", "bench.log", cap=math.inf, floor=0, estimate=0, grace=20),
)

# `full`: the whole test suite on the GPU, its own command (build first: a fresh machine).
FULL = (
    Step("preflight", "checks.log", cap=12, floor=15, estimate=8, grace=3),
    Step("build", "build.log", cap=300, floor=0, estimate=150, background=True),
    Step("full test suite", "tests.log", cap=math.inf, floor=60, estimate=0, after_build=True),
)

PLANS = {"all": ALL, "full": FULL}


def scaled(step: Step, scale: float) -> Step:
    """`step` with its times multiplied by `scale` (the stub tests run the plan in seconds)."""
    return dataclasses.replace(
        step,
        cap=step.cap * scale,
        floor=step.floor * scale,
        estimate=step.estimate * scale,
        grace=step.grace * scale,
    )


def reserve(steps: tuple[Step, ...], index: int, skip: frozenset[str] = frozenset()) -> float:
    """Seconds held back for the steps after `index` that will still run."""
    return sum(s.floor for s in steps[index + 1 :] if s.name not in skip)


def wait_index(steps: tuple[Step, ...]) -> int:
    """Index of the first step that waits for the background build, or len(steps)."""
    return next((i for i, s in enumerate(steps) if s.needs_extension or s.after_build), len(steps))


def step_limit(
    steps: tuple[Step, ...],
    index: int,
    now: float,
    deadline: float,
    margin: float,
    skip: frozenset[str] = frozenset(),
) -> float:
    """Seconds step `index` may run when it starts at `now` (it is then interrupted, and killed
    its grace later). The background build must end before the step that waits for it."""
    s = steps[index]
    after = wait_index(steps) - 1 if s.background else index
    return min(s.cap, deadline - now - reserve(steps, after, skip) - s.grace - margin)


def timeline(
    steps: tuple[Step, ...], deadline: float, margin: float, worst: bool = False
) -> list[tuple[str, float, float]]:
    """[(name, start, end)] of the run as gpu_run.py schedules it: each step takes its estimate
    (at most its limit), or with `worst` its whole limit and the grace after it."""
    rows, now, build_end = [], 0.0, 0.0
    wait = wait_index(steps)
    for i, s in enumerate(steps):
        if i == wait:
            now = max(now, build_end)
        limit = step_limit(steps, i, now, deadline, margin)
        if math.isinf(s.cap):  # the last step: whatever is left
            took = limit + s.grace if worst else limit
        else:
            took = limit + s.grace if worst else min(s.estimate, limit)
        took = max(0.0, took)
        rows.append((s.name, now, now + took))
        if s.background:
            build_end = now + took
        else:
            now += took
    return rows


def describe(steps: tuple[Step, ...], deadline: float, margin: float) -> str:
    rows = timeline(steps, deadline, margin)
    worst = timeline(steps, deadline, margin, worst=True)
    lines = [
        f"deadline {deadline:.0f} s (a device command is at most {COMMAND_LIMIT_S:.0f} s), "
        f"margin {margin:.0f} s; a step is interrupted at its limit, killed its grace later",
        f"{'step':28} {'cap s':>6} {'floor s':>7} {'planned s':>16} {'worst case s':>16}",
    ]
    for s, (_, start, end), (_, wstart, wend) in zip(steps, rows, worst, strict=True):
        cap = "rest" if math.isinf(s.cap) else f"{s.cap:.0f}"
        lines.append(
            f"{s.name:28} {cap:>6} {s.floor:>7.0f} {start:>7.0f} - {end:>6.0f} {wstart:>7.0f} - {wend:>6.0f}"
        )
    lines.append(
        f"planned end {max(r[2] for r in rows):.0f} s, worst case "
        f"{max(r[2] for r in worst):.0f} s: within the {COMMAND_LIMIT_S:.0f} s command"
    )
    return "\n".join(lines)
