"""Every kernel of every GPU backend on the inputs where memory bugs hide, for compute-sanitizer:

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 3 \\
        python scripts/sanitizer_cases.py [--backends extension triton] [--device cuda]

PYTORCH_NO_CUDA_MEMORY_CACHING=1 (scripts/gpu_check.sh sets it; this script warns without it)
gives every tensor its own cudaMalloc, so an access a few bytes past a tensor is outside any
allocation and memcheck reports it; under PyTorch's caching allocator it would land inside a
2 MiB segment and pass. initcheck then sees reads of memory no kernel wrote.

Cases: float32, float16 and bfloat16; NCHW and channels_last; C % 8 != 0 with an odd H*W
(3, 5, 7, 3); odd H*W with C % 8 == 0 (2, 64, 9, 9); aligned rows (2, 24, 8, 8); H*W == 1
(5, 16, 1, 1: NCHW reductions take the channels_last path); N*H*W == 1 (1, 12, 1, 1: one value
per channel, no running-stat update, which needs two); and a storage offset of one element
(2, 24, 8, 8 at offset 1: no 16-byte alignment, the scalar paths). Each case runs the six
primitive ops as a training step, an eval step and a two-BatchNorm tail compose them. A line
per case as it finishes, so a run cut at its time limit shows how far it got.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

import fused_residual
from fused_residual.backends import backend_ops

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SHAPES = (
    ((3, 5, 7, 3), 0),
    ((2, 64, 9, 9), 0),
    ((2, 24, 8, 8), 0),
    ((5, 16, 1, 1), 0),
    ((1, 12, 1, 1), 0),
    ((2, 24, 8, 8), 1),
)


def tensor(shape, dtype, channels_last: bool, offset: int, device: str) -> torch.Tensor:
    """Random values of `shape` in the layout, starting `offset` elements into its storage."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    strides = torch.empty(shape).contiguous(memory_format=fmt).stride()
    storage = torch.randn(math.prod(shape) + offset, device=device).to(dtype)
    return storage[offset:].as_strided(shape, strides)


def run_case(ops, shape, dtype, channels_last: bool, offset: int, device: str) -> None:
    x = tensor(shape, dtype, channels_last, offset, device)
    r = tensor(shape, dtype, channels_last, offset, device)
    c = shape[1]
    w, b = torch.rand(c, device=device) + 0.5, torch.randn(c, device=device)
    rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
    count = shape[0] * shape[2] * shape[3]
    mean, var = ops.stats(x)
    if count > 1:
        ops.update_running_stats(mean, var, count, rm, rv, 0.1)
    _, mask = ops.apply(x, r, mean, var, w, b, 1e-5, True)
    g = tensor(shape, dtype, channels_last, offset, device)
    sum_dy, sum_dy_xmu, _ = ops.backward_reduce(g, mask, x, mean, var, 1e-5)
    ops.backward_apply(g, mask, x, mean, var, w, sum_dy, sum_dy_xmu, 1e-5, count, True, True)
    ops.backward_apply(g, mask, x, mean, var, w, sum_dy, sum_dy_xmu, 1e-5, count, False, True)
    ops.apply(x, None, rm, rv, None, None, 1e-5, False)  # eval, no residual, no mask
    ops.backward_apply(g, mask, x, rm, rv, None, None, None, 1e-5, count, True, False)
    # The two-BatchNorm tail, its second input in the other layout.
    other = torch.contiguous_format if channels_last else torch.channels_last
    x2 = r.contiguous(memory_format=other)
    mean2, var2 = ops.stats(x2)
    _, mask2 = ops.dual_apply(x, mean, var, w, b, x2, mean2, var2, w, None, 1e-5, 1e-3, True)
    ops.backward_reduce(g, mask2, x2, mean2, var2, 1e-3)
    if device == "cuda":
        torch.cuda.synchronize()  # an error surfaces at this case, not a later one


# Shape-major, so that a run cut short has seen every dtype and layout.
CASES = [
    (shape, offset, dtype, channels_last)
    for shape, offset in SHAPES
    for dtype in DTYPES
    for channels_last in (False, True)
]


def run_backend(name: str, device: str, cases: int) -> int:
    ops = backend_ops(name)
    for shape, offset, dtype, channels_last in CASES[:cases]:
        run_case(ops, shape, dtype, channels_last, offset, device)
        print(
            f"  {name} {str(dtype).removeprefix('torch.')} {'cl' if channels_last else 'nchw'} "
            f"{'x'.join(map(str, shape))}{f' offset {offset}' if offset else ''}: ok",
            flush=True,
        )
    return len(CASES[:cases])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backends", nargs="*", default=None, help="default: every fused backend available")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--cases", type=int, default=len(CASES), help="the first N cases only")
    args = parser.parse_args()
    if args.device == "cuda" and os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING") != "1":
        print(
            "warning: PYTORCH_NO_CUDA_MEMORY_CACHING is not 1: small overruns stay inside the caching "
            "allocator's segments, unseen by memcheck",
            flush=True,
        )
    available = fused_residual.available_backends(args.device)
    names = args.backends or [b for b in available if b != "reference"]
    missing = [n for n in names if n not in available]
    if missing:
        print(f"backends not available on {args.device}: {missing} (available: {available})", flush=True)
        return 1
    for name in names:
        n = run_backend(name, args.device, args.cases)
        print(f"sanitizer cases done: {name} {n}/{len(CASES)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
