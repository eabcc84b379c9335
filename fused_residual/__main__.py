"""`python -m fused_residual`: check every backend here against the reference, then time them.

1. Correctness: each available fused backend against eager PyTorch (forward, the four
   gradients and the running stats) on a few shapes, dtypes and layouts, float64 truth.
2. Speed: the fused tail (training forward+backward and eval forward) against eager PyTorch,
   and a FusedResidualBlock training step against the seed block. A progress line per case,
   then a table of ms, effective GB/s (bench_utils.ideal_bytes) and speedup.
Exits non-zero if a backend disagrees with the reference.
"""

from __future__ import annotations

import argparse
import platform
import sys

import torch

import fused_residual
from fused_residual.bench_utils import ideal_bytes, make_tail_problem, median_ms, tail_callable
from fused_residual.reference import bn_add_relu_reference
from fused_residual.seed import ResidualBlock


def _max_rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-12)).item()


def check_backend(backend: str, device: str) -> list[str]:
    """Compare `backend` with eager PyTorch; return the failures (empty when all agree)."""
    failures = []
    dtypes = [torch.float32] + ([torch.bfloat16] if device == "cuda" else [])
    for dtype in dtypes:
        for channels_last in (False, True):
            for training in (True, False):
                shape = (4, 16, 9, 9)
                results = []
                for name, compute_dtype in ((backend, dtype), ("reference", torch.float64)):
                    torch.manual_seed(0)  # the same problem for both
                    p = make_tail_problem(shape, dtype, channels_last, device)
                    leaves = [t.detach().to(compute_dtype).requires_grad_(True)
                              for t in (p.input, p.residual, p.weight, p.bias)]
                    rm, rv = p.running_mean.to(compute_dtype), p.running_var.to(compute_dtype)
                    out = fused_residual.bn_add_relu(*leaves[:2], rm, rv, *leaves[2:], training,
                                                     backend=name)
                    grads = torch.autograd.grad(out, leaves, p.grad.to(compute_dtype))
                    results.append((out, *grads, rm, rv))
                worst = max(_max_rel_error(a, b) for a, b in zip(*results, strict=True))
                # bf16 output: 2^-8 relative rounding, a few roundings deep; fp32: far below.
                limit = 3e-2 if dtype == torch.bfloat16 else 1e-4
                status = "ok" if worst <= limit else "MISMATCH"
                label = (f"{backend:9s} {dtype!s:15s} {'channels_last' if channels_last else 'NCHW':13s} "
                         f"{'train' if training else 'eval':5s}")
                print(f"  check {label} max rel err {worst:.2e} {status}", flush=True)
                if status != "ok":
                    failures.append(label)
    return failures


def _eager_tail(x, r, rm, rv, w, b, training):
    return bn_add_relu_reference(x, r, rm, rv, w, b, training)


def _fused_tail(backend):
    def run(x, r, rm, rv, w, b, training):
        return fused_residual.bn_add_relu(x, r, rm, rv, w, b, training, backend=backend)
    return run


def time_tails(device: str, backends: list[str], reps: int) -> list[tuple]:
    if device == "cuda":
        cases = [((128, 256, 56, 56), torch.bfloat16, True), ((128, 1024, 14, 14), torch.float32, False)]
    else:
        cases = [((32, 64, 56, 56), torch.float32, False), ((32, 64, 56, 56), torch.float32, True)]
    rows = []
    for shape, dtype, channels_last in cases:
        problem = make_tail_problem(shape, dtype, channels_last, device)
        layout = "channels_last" if channels_last else "NCHW"
        for mode in ("train_fwdbwd", "eval_fwd"):
            case = f"tail {mode} {tuple(shape)} {str(dtype).removeprefix('torch.')} {layout}"
            eager_ms = None
            for name in ["reference", *backends]:
                fn = tail_callable(problem, mode, _eager_tail if name == "reference" else _fused_tail(name))
                ms = median_ms(fn, device, reps=reps)
                eager_ms = ms if name == "reference" else eager_ms
                gbps = ideal_bytes(mode, problem.numel, problem.itemsize) / ms / 1e6
                rows.append((case, "eager" if name == "reference" else name, ms, gbps, eager_ms / ms))
                print(f"  time {case}: {rows[-1][1]} {ms:.3f} ms", flush=True)
    return rows


def time_blocks(device: str, backends: list[str], reps: int) -> list[tuple]:
    shape = (64, 64, 56, 56) if device == "cuda" else (8, 64, 28, 28)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows = []
    x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    case = f"block train step {tuple(shape)} {str(dtype).removeprefix('torch.')} channels_last"
    seed = ResidualBlock(shape[1], shape[1]).to(device=device, dtype=dtype,
                                                memory_format=torch.channels_last)
    eager_ms = None
    for name in ["reference", *backends]:
        if name == "reference":
            block = seed
        else:
            block = fused_residual.FusedResidualBlock(shape[1], shape[1], backend=name)
            block.load_state_dict(seed.state_dict())
            block.to(device=device, dtype=dtype, memory_format=torch.channels_last)

        def run(block=block):
            out = block(x)
            out.backward(torch.ones_like(out))

        ms = median_ms(run, device, reps=reps)
        eager_ms = ms if name == "reference" else eager_ms
        rows.append((case, "seed block" if name == "reference" else name, ms, float("nan"), eager_ms / ms))
        print(f"  time {case}: {rows[-1][1]} {ms:.3f} ms", flush=True)
    return rows


def print_table(rows: list[tuple]) -> None:
    print("\n| case | provider | ms | GB/s | speedup vs eager |\n|---|---|---:|---:|---:|")
    for case, provider, ms, gbps, speedup in rows:
        gb = "" if gbps != gbps else f"{gbps:.1f}"
        print(f"| {case} | {provider} | {ms:.3f} | {gb} | {speedup:.2f}x |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fused_residual", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=10, help="timed repetitions per case (median)")
    parser.add_argument("--no-timing", action="store_true", help="only check correctness")
    args = parser.parse_args(argv)
    device = args.device
    backends = [b for b in fused_residual.available_backends(device) if b != "reference"]
    if device == "cuda":
        where = torch.cuda.get_device_name()
    else:
        where = f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"fused_residual {fused_residual.__version__}, torch {torch.__version__}, {device}: {where}")
    print(f"fused backends available: {backends or 'none (only the reference)'}")
    failures = []
    for backend in backends:
        failures += check_backend(backend, device)
    if failures:
        print(f"\n{len(failures)} case(s) disagree with the reference: {failures}")
        return 1
    print("all fused backends agree with the reference")
    timed = [b for b in backends if not (b == "triton" and device == "cpu")]  # interpreter: not timed
    if args.no_timing or not timed:
        return 0
    rows = time_tails(device, timed, args.reps) + time_blocks(device, timed, args.reps)
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
