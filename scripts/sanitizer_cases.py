"""A small case of every kernel of every GPU backend, for compute-sanitizer.

    compute-sanitizer --tool memcheck python scripts/sanitizer_cases.py [--backends extension triton]

Runs each primitive op once per dtype (float32, bfloat16) and layout (NCHW, channels_last),
with shapes whose element counts are not multiples of 8 or of a block, so tails are covered;
H*W a multiple of 8 or not (Triton rows / flat mode with its coefficient prologue), and
H*W == 1 (NCHW reductions on the channels_last path).
"""

from __future__ import annotations

import argparse

import torch

import fused_residual
from fused_residual.backends import backend_ops


def run_backend(name: str, quick: bool = False) -> None:
    ops = backend_ops(name)
    # --quick (stage 1 of gpu_check.sh): each kernel once, float32; the second shape's rows are
    # whole mask bytes in both layouts, the first shape's in neither.
    dtypes = (torch.float32,) if quick else (torch.float32, torch.bfloat16)
    shapes = ((3, 5, 7, 3), (2, 64, 4, 4), (5, 16, 1, 1)) if quick else (
        (3, 5, 7, 3), (2, 64, 9, 9), (2, 24, 8, 8), (5, 16, 1, 1))
    for dtype in dtypes:
        for channels_last in (False, True):
            for shape in shapes:
                fmt = torch.channels_last if channels_last else torch.contiguous_format
                x = torch.randn(shape, device="cuda", dtype=dtype).contiguous(memory_format=fmt)
                r = torch.randn_like(x)
                c = shape[1]
                w, b = torch.rand(c, device="cuda") + 0.5, torch.randn(c, device="cuda")
                rm, rv = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
                count = shape[0] * shape[2] * shape[3]
                mean, var = ops.stats(x)
                ops.update_running_stats(mean, var, count, rm, rv, 0.1)
                out, mask = ops.apply(x, r, mean, var, w, b, 1e-5, True)
                g = torch.randn_like(out)
                sum_dy, sum_dy_xmu, _ = ops.backward_reduce(g, mask, x, mean, var, 1e-5)
                ops.backward_apply(g, mask, x, mean, var, w, sum_dy, sum_dy_xmu, 1e-5, count, True, True)
                ops.backward_apply(g, mask, x, rm, rv, None, None, None, 1e-5, count, True, False)
                ops.backward_apply(g, mask, x, mean, var, w, sum_dy, sum_dy_xmu, 1e-5, count, False, True)
                ops.apply(x, None, rm, rv, None, None, 1e-5, False)
                # The two-BatchNorm apply, its second input in the other layout.
                other = torch.contiguous_format if channels_last else torch.channels_last
                ops.dual_apply(x, mean, var, w, b, r.contiguous(memory_format=other), rm, rv, None, b,
                               1e-5, 1e-3, True)
    torch.cuda.synchronize()
    print(f"sanitizer cases done: {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backends", nargs="*", default=None)
    parser.add_argument("--quick", action="store_true", help="one case per kernel, float32 only")
    args = parser.parse_args()
    names = args.backends or [b for b in fused_residual.available_backends("cuda") if b != "reference"]
    for name in names:
        run_backend(name, args.quick)


if __name__ == "__main__":
    main()
