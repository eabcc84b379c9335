"""The torch.compile baselines are compiled code: a baseline that would silently run eager
(recompile limit hit, a recompile while timed, nothing compiled) fails the benchmark.
Not timed; runs under `pytest benchmarks/ --benchmark-disable` (CI) and --benchmark-only."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from bench_common import DEVICE, compile_baseline, graphs_compiled, strict_compile, time_case
from test_tail_bench import forward_for

from fused_residual.bench_utils import make_tail_problem, tail_callable


class FakeBenchmark:
    """Stands in for pytest-benchmark's fixture: runs the target `rounds` times."""

    disabled = False

    def __init__(self):
        self.calls = 0

    def pedantic(self, target, rounds, warmup_rounds, iterations):
        for _ in range(warmup_rounds + rounds * iterations):
            target()
            self.calls += 1


def scale(x: torch.Tensor) -> torch.Tensor:
    return (x * 2).relu()


def test_one_compiled_function_for_many_shapes_fails_instead_of_running_eager():
    """The defect the baselines had: one compiled function for every case. Past the recompile
    limit torch.compile would run eager code; under strict_compile it raises."""
    fn = torch.compile(scale, dynamic=False)  # no fullgraph: the limit alone must raise
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=2), strict_compile(timing=False):
        with pytest.raises(torch._dynamo.exc.FailOnRecompileLimitHit):
            for n in range(1, 6):
                fn(torch.ones(n, device=DEVICE))


def test_recompile_while_timed_fails():
    fn = compile_baseline(scale)
    shapes = iter([3, 3, 3, 3, 5])  # warm-up at one shape, then a new shape while timed

    def run():
        fn(torch.ones(next(shapes), device=DEVICE))

    with pytest.raises(torch._dynamo.exc.RecompileError):
        time_case(FakeBenchmark(), run, compiled=True)


def test_a_baseline_that_compiled_nothing_fails():
    """A function called a compile baseline but never compiled (eager in disguise)."""
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match="compiled no graph"):
        time_case(FakeBenchmark(), lambda: scale(torch.ones(3, device=DEVICE)), compiled=True)


def test_each_tail_case_gets_a_fresh_compiled_function():
    """Two tail cases in a row, as the benchmark runs them: each compiles exactly one graph of
    its own (after its reset) and is timed without a recompile."""
    for shape in ((2, 3, 4, 4), (3, 5, 2, 2)):
        problem = make_tail_problem(shape, torch.float32, False, DEVICE)
        run = tail_callable(problem, "eval_fwd", forward_for("compile"))
        bench = FakeBenchmark()
        before = graphs_compiled()
        time_case(bench, run, compiled=True)
        assert graphs_compiled() == before + 1
        assert bench.calls >= 1
