"""`triton_bn_apply`: normalize, scale and shift, add the residual, ReLU, packed mask; and
`triton_bn_dual_apply`, the same kernels adding a second normalized input instead of a
residual (the tail of a downsampling block: two BatchNorms feeding one add).

Per element x of channel c, in fp32 (fp64 for fp64 input):

    invstd_c = 1 / sqrt(var_c + eps)
    y        = (x - mean_c) * (invstd_c * w_c) + b_c (+ r)      w = 1, b = 0 when absent
               (dual: + ((x2 - mean2_c) * (invstd2_c * w2_c) + b2_c) instead of + r)
    out      = y < 0 ? 0 : y            (NaN propagates), rounded once to the input dtype
    mask bit = y > 0                    element e (memory order) -> bit e % 8 of byte e // 8

`(x - mean) * scale` rather than `x * scale + shift` keeps the cancellation of a large mean
exact. Tiling (see `_common.py`): "rows" mode tiles the dense row matrix in blocks
[BLOCK_R, BLOCK_J, 8] whose last axis is one mask byte, so a block packs its bits with a
shift and a sum over that axis and loads the per-channel values once per row (NCHW) or per
column (NHWC); "flat" mode (rows not a multiple of 8 long) tiles the memory order in
[BLOCK_J, 8] blocks and gathers the per-channel values of every element.

Bytes moved: read x (+ r or x2), write out: (2 or 3) * numel * itemsize, plus numel / 8 for the
mask and a few bytes per channel.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    channel_affine,
    check_per_channel,
    elementwise_config,
    empty_like_working,
    flat_channel,
    join_f64,
    like_input,
    load_acc,
    per_channel,
    prepare_input,
    split_f64,
    triton_op,
    wrap_triton,
)


@triton.jit
def _apply_block(
    x_ptr, r_ptr, out_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, mean2_ptr, var2_ptr, w2_ptr, b2_ptr,
    offs, valid, ch, cmask, eps, eps2,
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, DUAL: tl.constexpr,
    HAS_WEIGHT2: tl.constexpr, HAS_BIAS2: tl.constexpr, IS_F64: tl.constexpr,
):
    """Computes and stores one block of `out`; returns the pre-ReLU values y. With DUAL,
    `r_ptr` is the second input x2, normalized with its own statistics and affine."""
    mean, scale, bias = channel_affine(mean_ptr, var_ptr, w_ptr, b_ptr, ch, cmask, eps,
                                       HAS_WEIGHT, HAS_BIAS, IS_F64)
    y = (load_acc(x_ptr, offs, valid, IS_F64) - mean) * scale + bias
    if DUAL:
        mean2, scale2, bias2 = channel_affine(mean2_ptr, var2_ptr, w2_ptr, b2_ptr, ch, cmask, eps2,
                                              HAS_WEIGHT2, HAS_BIAS2, IS_F64)
        y = y + ((load_acc(r_ptr, offs, valid, IS_F64) - mean2) * scale2 + bias2)
    elif HAS_RESIDUAL:
        y = y + load_acc(r_ptr, offs, valid, IS_F64)
    out = tl.where(y < 0, 0.0, y)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=valid)
    return y


@triton.jit
def _apply_rows_kernel(
    x_ptr, r_ptr, out_ptr, mask_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, mean2_ptr, var2_ptr, w2_ptr, b2_ptr,
    ROWS, COLS8, C, col_blocks, eps_hi, eps_lo, eps2_hi, eps2_lo,
    NHWC: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    DUAL: tl.constexpr, HAS_WEIGHT2: tl.constexpr, HAS_BIAS2: tl.constexpr,
    SAVE_MASK: tl.constexpr, IS_F64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """Block [BLOCK_R rows, BLOCK_J bytes, 8 bits] of the (ROWS, 8 * COLS8) row matrix."""
    pid = tl.program_id(0)
    pid_r = pid // col_blocks
    pid_c = pid - pid_r * col_blocks
    eps = join_f64(eps_hi, eps_lo, IS_F64)
    eps2 = join_f64(eps2_hi, eps2_lo, IS_F64)
    row = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    byte = pid_c * BLOCK_J + tl.arange(0, BLOCK_J)
    bit = tl.arange(0, 8)
    col = byte[None, :, None] * 8 + bit[None, None, :]
    row_ok = row < ROWS
    byte_ok = byte < COLS8
    valid = row_ok[:, None, None] & byte_ok[None, :, None]
    offs = row[:, None, None] * (COLS8 * 8) + col
    if NHWC:  # the column is the channel
        ch = col
        cmask = byte_ok[None, :, None]
    else:  # row n * C + c
        ch = (row % C).to(tl.int32)[:, None, None]
        cmask = row_ok[:, None, None]
    y = _apply_block(x_ptr, r_ptr, out_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, mean2_ptr, var2_ptr, w2_ptr,
                     b2_ptr, offs, valid, ch, cmask, eps, eps2,
                     HAS_RESIDUAL, HAS_WEIGHT, HAS_BIAS, DUAL, HAS_WEIGHT2, HAS_BIAS2, IS_F64)
    if SAVE_MASK:
        packed = tl.sum((y > 0).to(tl.int32) << bit[None, None, :], 2)
        tl.store(mask_ptr + row[:, None] * COLS8 + byte[None, :], packed.to(tl.uint8),
                 mask=row_ok[:, None] & byte_ok[None, :])


@triton.jit
def _apply_flat_kernel(
    x_ptr, r_ptr, out_ptr, mask_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, mean2_ptr, var2_ptr, w2_ptr, b2_ptr,
    numel, C, HW, c_inv, hw_inv, eps_hi, eps_lo, eps2_hi, eps2_lo,
    NHWC: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    DUAL: tl.constexpr, HAS_WEIGHT2: tl.constexpr, HAS_BIAS2: tl.constexpr,
    SAVE_MASK: tl.constexpr, IS_F64: tl.constexpr, FAST_DIV: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """Block [BLOCK_J bytes, 8 bits] of the flat memory order."""
    pid = tl.program_id(0)
    eps = join_f64(eps_hi, eps_lo, IS_F64)
    eps2 = join_f64(eps2_hi, eps2_lo, IS_F64)
    base = pid.to(tl.int64) * (BLOCK_J * 8)
    byte = tl.arange(0, BLOCK_J)
    bit = tl.arange(0, 8)
    local = byte[:, None] * 8 + bit[None, :]
    offs = base + local
    valid = offs < numel
    ch = flat_channel(base, local, C, HW, c_inv, hw_inv, NHWC, FAST_DIV)
    y = _apply_block(x_ptr, r_ptr, out_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, mean2_ptr, var2_ptr, w2_ptr,
                     b2_ptr, offs, valid, ch, valid, eps, eps2,
                     HAS_RESIDUAL, HAS_WEIGHT, HAS_BIAS, DUAL, HAS_WEIGHT2, HAS_BIAS2, IS_F64)
    if SAVE_MASK:
        packed = tl.sum(((y > 0) & valid).to(tl.int32) << bit[None, :], 1)  # padding bits stay 0
        nbytes = (numel + 7) // 8
        byte_idx = pid.to(tl.int64) * BLOCK_J + byte
        tl.store(mask_ptr + byte_idx, packed.to(tl.uint8), mask=byte_idx < nbytes)


@dataclasses.dataclass(frozen=True)
class _SecondBatchNorm:
    """The second normalized input of bn_dual_apply and its per-channel tensors."""

    input: Tensor
    mean: Tensor
    var: Tensor
    weight: Tensor | None
    bias: Tensor | None
    eps: float


def _launch_apply(
    input: Tensor, residual: Tensor | None, mean: Tensor, var: Tensor, weight: Tensor | None,
    bias: Tensor | None, eps: float, save_mask: bool, second: _SecondBatchNorm | None = None,
) -> tuple[Tensor, Tensor]:
    """bn_apply, or bn_dual_apply when `second` is given (then `residual` is None): the same
    kernels, the DUAL flag switching the residual load for a second normalized input."""
    x, geo = prepare_input(input)
    r = None if residual is None else like_input(residual, input, geo, "residual")
    channel_tensors = {"mean": mean, "var": var, "weight": weight, "bias": bias}
    if second is not None:
        r = like_input(second.input, input, geo, "input2")
        channel_tensors.update(mean2=second.mean, var2=second.var, weight2=second.weight,
                               bias2=second.bias)
    for name, t in channel_tensors.items():
        check_per_channel(t, geo.c, x.device, name)
    mean, var, weight, bias = (per_channel(t) for t in (mean, var, weight, bias))
    out = empty_like_working(x, geo)
    nbytes = (geo.numel + 7) // 8 if save_mask else 0
    mask = torch.empty((nbytes,), dtype=torch.uint8, device=x.device)
    if geo.numel == 0:
        return out, mask
    cfg = elementwise_config(geo)
    # Absent optional tensors are replaced by a tensor the kernel never reads (its
    # constexpr flag is off), so no null pointers reach the launcher.
    mean2, var2, weight2, bias2 = (None, None, None, None) if second is None else (
        per_channel(t) for t in (second.mean, second.var, second.weight, second.bias))
    ptrs = (x, x if r is None else r, out, mask if save_mask else out,
            *(mean if t is None else t for t in (mean, var, weight, bias, mean2, var2, weight2, bias2)))
    eps_args = (*split_f64(eps), *split_f64(eps if second is None else second.eps))
    flags = dict(NHWC=geo.nhwc, HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None,
                 HAS_BIAS=bias is not None, DUAL=second is not None, HAS_WEIGHT2=weight2 is not None,
                 HAS_BIAS2=bias2 is not None, SAVE_MASK=save_mask, IS_F64=geo.is_f64)
    if cfg.rows_mode:
        wrap_triton(_apply_rows_kernel)[cfg.grid](
            *ptrs, geo.rows, geo.cols // 8, geo.c, cfg.col_blocks, *eps_args,
            **flags, BLOCK_R=cfg.block_r, BLOCK_J=cfg.block_j, num_warps=cfg.num_warps,
        )
    else:
        wrap_triton(_apply_flat_kernel)[cfg.grid](
            *ptrs, geo.numel, geo.c, geo.hw, 1.0 / geo.c, 1.0 / geo.hw, *eps_args,
            **flags, FAST_DIV=cfg.fast_div, BLOCK_J=cfg.block_j, num_warps=cfg.num_warps,
        )
    return out, mask


@triton_op(
    "fused_residual::triton_bn_apply",
    mutates_args=(),
    schema="(Tensor input, Tensor? residual, Tensor mean, Tensor var, Tensor? weight, Tensor? bias, "
    "float eps, bool save_mask) -> (Tensor out, Tensor mask)",
)
def triton_bn_apply(
    input: Tensor,
    residual: Tensor | None,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    save_mask: bool,
) -> tuple[Tensor, Tensor]:
    """relu((x - mean) * invstd * w + b (+ residual)) in the working layout, and its packed
    mask (an empty uint8 tensor when `save_mask` is false)."""
    return _launch_apply(input, residual, mean, var, weight, bias, eps, save_mask)


@triton_op(
    "fused_residual::triton_bn_dual_apply",
    mutates_args=(),
    schema="(Tensor input, Tensor mean, Tensor var, Tensor? weight, Tensor? bias, Tensor input2, "
    "Tensor mean2, Tensor var2, Tensor? weight2, Tensor? bias2, float eps, float eps2, bool save_mask) "
    "-> (Tensor out, Tensor mask)",
)
def triton_bn_dual_apply(
    input: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    input2: Tensor,
    mean2: Tensor,
    var2: Tensor,
    weight2: Tensor | None,
    bias2: Tensor | None,
    eps: float,
    eps2: float,
    save_mask: bool,
) -> tuple[Tensor, Tensor]:
    """relu((x - mean) * invstd * w + b + (x2 - mean2) * invstd2 * w2 + b2) in input's working
    layout (input2 is copied into it when it is in another), and the packed mask: the tail of
    a downsampling block in one pass, the bytes of bn_apply with a residual."""
    return _launch_apply(input, None, mean, var, weight, bias, eps, save_mask,
                         _SecondBatchNorm(input2, mean2, var2, weight2, bias2, eps2))
