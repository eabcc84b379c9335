"""`python -m fused_residual`: honest about missing backends, one-line errors, timings with spread."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers import FUSED_BACKENDS

from fused_residual.__main__ import main
from fused_residual.bench_utils import Timing, dtype_name, time_ms


def run_main(*args: str, prelude: str = "") -> subprocess.CompletedProcess:
    code = prelude + "import sys; from fused_residual.__main__ import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=env, timeout=300)


def bad_device() -> str:
    return "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"


@pytest.mark.parametrize("args, message", [
    (("--device", "mps"), "--device mps: fused_residual has kernels for cpu and cuda only"),
    (("--device", "tpu0"), "--device 'tpu0' is not a device"),
    (("--device", bad_device()), f"--device {bad_device()}: "),
    (("--reps", "0"), "--reps must be at least 1, got 0"),
])
def test_bad_arguments_give_one_line(args, message):
    done = run_main(*args)
    assert done.returncode == 2
    assert done.stderr.startswith("python -m fused_residual: error: ")
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr


def test_no_fused_backend_exits_nonzero():
    """The issue's case: without the extension (and no GPU for Triton), it says why and fails."""
    done = run_main("--device", "cpu", prelude="import sys; sys.modules['fused_residual._C'] = None\n")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "extension unavailable: fused_residual._C is not built" in done.stdout
    assert "triton    unavailable: " in done.stdout
    assert "FAIL: no fused backend serves cpu tensors" in done.stdout
    assert "agree with the reference" not in done.stdout


@pytest.mark.skipif("extension" not in FUSED_BACKENDS, reason="needs the built extension")
def test_checks_pass_with_the_extension(capsys):
    assert main(["--device", "cpu", "--no-timing"]) == 0
    out = capsys.readouterr().out
    assert "extension available" in out
    assert "all available fused backends agree with the reference: ['extension'" in out
    assert "torch.float32" not in out and "float32" in out


def test_timing_keeps_the_spread():
    calls = []
    timing = time_ms(lambda: calls.append(1), "cpu", warmup=2, reps=5)
    assert len(calls) == 7 and len(timing.times_ms) == 5
    t = Timing((3.0, 1.0, 2.0, 10.0, 4.0))
    assert (t.median, t.min, t.max) == (3.0, 1.0, 10.0)
    assert t.format(1) == "3.0 [1.0-10.0]"
    with pytest.raises(ValueError, match="reps must be at least 1"):
        time_ms(lambda: None, "cpu", reps=0)


def test_dtype_name():
    assert dtype_name(torch.bfloat16) == "bfloat16"
