"""`python -m fused_residual`: check every backend here against the reference, then time them.

0. Which fused backends can run on the device, and why the others cannot (and what the
   extension was compiled against).
1. Correctness: each available fused backend against eager PyTorch (forward, the four
   gradients and the running stats) on a few shapes, dtypes and layouts, float64 truth.
2. Speed: the fused tail (training forward+backward and eval forward) against eager PyTorch,
   and a FusedResidualBlock training step against the seed block. A progress line per case,
   then a table of ms (median over --reps runs, and their min-max spread), effective GB/s
   (bench_utils.ideal_bytes) and speedup (ratio of medians).
Exits 1 if no fused backend serves the device (backend "auto" would run the unfused
reference) or if a backend disagrees with the reference; 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import platform
import sys
import warnings

import torch

import fused_residual
from fused_residual import ops
from fused_residual.backends import BACKEND_NAMES, resolve_backend, why_unavailable
from fused_residual.bench_utils import dtype_name, ideal_bytes, make_tail_problem, tail_callable, time_ms
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
                layout = "channels_last" if channels_last else "NCHW"
                mode = "train" if training else "eval"
                label = f"{backend:9s} {dtype_name(dtype):8s} {layout:13s} {mode:5s}"
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
            case = f"tail {mode} {tuple(shape)} {dtype_name(dtype)} {layout}"
            eager = None
            for name in ["reference", *backends]:
                fn = tail_callable(problem, mode, _eager_tail if name == "reference" else _fused_tail(name))
                timing = time_ms(fn, device, reps=reps)
                eager = timing if name == "reference" else eager
                gbps = ideal_bytes(mode, problem.numel, problem.itemsize) / timing.median / 1e6
                rows.append((case, "eager" if name == "reference" else name, timing, gbps,
                             eager.median / timing.median))
                print(f"  time {case}: {rows[-1][1]} {timing.format()} ms", flush=True)
    return rows


def time_blocks(device: str, backends: list[str], reps: int) -> list[tuple]:
    shape = (64, 64, 56, 56) if device == "cuda" else (8, 64, 28, 28)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows = []
    x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    case = f"block train step {tuple(shape)} {dtype_name(dtype)} channels_last"
    seed = ResidualBlock(shape[1], shape[1]).to(device=device, dtype=dtype,
                                                memory_format=torch.channels_last)
    eager = None
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

        timing = time_ms(run, device, reps=reps)
        eager = timing if name == "reference" else eager
        rows.append((case, "seed block" if name == "reference" else name, timing, float("nan"),
                     eager.median / timing.median))
        print(f"  time {case}: {rows[-1][1]} {timing.format()} ms", flush=True)
    return rows


def print_table(rows: list[tuple], reps: int) -> None:
    print(f"\nms: median of {reps} runs [min-max]; GB/s at the median; speedup: ratio of medians")
    print("| case | provider | ms | GB/s | speedup vs eager |\n|---|---|---:|---:|---:|")
    for case, provider, timing, gbps, speedup in rows:
        gb = "" if gbps != gbps else f"{gbps:.1f}"
        print(f"| {case} | {provider} | {timing.format()} | {gb} | {speedup:.2f}x |")


def _parse_device(device: str) -> str:
    """The checked device string, or raise ValueError with a one-line reason."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device; use cpu or cuda") from None
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device}: fused_residual has kernels for cpu and cuda only")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: no CUDA GPU is visible here "
                             f"(torch {torch.__version__}, torch.cuda.is_available() is False)")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    return device


def report_backends(device_type: str) -> list[str]:
    """Print which fused backends serve `device_type` and why the others do not; return the
    available ones."""
    available = []
    for name in BACKEND_NAMES[:-1]:
        why = why_unavailable(name, device_type)
        if why is None:
            available.append(name)
        print(f"  {name:9s} {'available' if why is None else 'unavailable: ' + why}")
    info = ops.BUILD_INFO
    if ops.EXTENSION_LOADED and info is not None:
        cuda = (f"CUDA kernels for {info.CUDA_ARCHS}" if info.CUDA_KERNELS
                else f"no CUDA kernels ({info.WHY_NO_CUDA})")
        print(f"  extension compiled against torch {info.TORCH_VERSION}: CPU kernels, {cuda}")
    return available


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fused_residual", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when a GPU is visible, else cpu)")
    parser.add_argument("--reps", type=int, default=10,
                        help="timed runs per case, after 3 untimed ones (default 10)")
    parser.add_argument("--no-timing", action="store_true", help="only check correctness")
    args = parser.parse_args(argv)
    try:
        device = _parse_device(args.device)
        if args.reps < 1:
            raise ValueError(f"--reps must be at least 1, got {args.reps}")
    except ValueError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    device_type = torch.device(device).type
    if device_type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"fused_residual {fused_residual.__version__}, torch {torch.__version__}, {device}: {where}")
    print(f"fused backends for {device_type} tensors:")
    backends = report_backends(device_type)
    failures = []
    for backend in backends:
        failures += check_backend(backend, device)
    if failures:
        print(f"\n{len(failures)} case(s) disagree with the reference: {failures}")
        return 1
    if backends:
        print(f"all available fused backends agree with the reference: {backends}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's reasons are printed above
        auto = resolve_backend("auto", device_type)
    if auto == "reference":
        print(f"FAIL: no fused backend serves {device_type} tensors here (reasons above): backend "
              f"'auto' would run the unfused reference")
        return 1
    timed = [b for b in backends if not (b == "triton" and device_type == "cpu")]  # interpreter: untimed
    if args.no_timing:
        return 0
    rows = time_tails(device, timed, args.reps) + time_blocks(device, timed, args.reps)
    print_table(rows, args.reps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
