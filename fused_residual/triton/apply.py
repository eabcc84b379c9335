"""`triton_bn_apply`: normalize, scale and shift, add the residual, ReLU, packed mask; and
`triton_bn_dual_apply`, the same kernels adding a second normalized input instead of a
residual (the tail of a downsampling block: two BatchNorms feeding one add).

Per element x of channel c, in fp32 (fp64 for fp64 input):

    scale_c  = w_c / sqrt(var_c + eps),  shift_c = b_c      w = 1, b = 0 when absent
    y        = (x - mean_c) * scale_c + shift_c (+ r)
               (dual: shift_c = b_c + b2_c and + (x2 - mean2_c) * scale2_c instead of + r)
    out      = y < 0 ? 0 : y            (NaN propagates), rounded once to the input dtype
    mask bit = y > 0                    element e (memory order) -> bit e % 8 of byte e // 8

The per-channel coefficients (mean, scale, shift) are computed once per channel, so an
element costs one subtraction and one multiply-add (compiled, Triton contracts them into
an FMA; the mask bit is the sign of the very y that is stored). Why `(x - mean) * scale +
shift` and not `x * scale + (shift - mean * scale)`, one operation fewer: with a mean offset
of 1e4 and a spread of 1, `shift - mean * scale` is ~1e4 rounded to fp32 (error ~5e-4), and
so is every output, ~4000 fp32 ulps of an O(1) result; `x - mean` is exact there (Sterbenz)
and the error stays a few ulps of y.

Tiling (see `_common.py`): "rows" mode tiles the dense row matrix in blocks
[BLOCK_R, BLOCK_J, 8] whose last axis is one mask byte, so a block packs its bits with a
shift and a sum over that axis and computes the coefficients once per row (NCHW) or column
(NHWC) of the block. "flat" mode (rows not a multiple of 8 long: NCHW 14x14 and 7x7,
channels_last with C % 8 != 0) tiles the memory order in [BLOCK_J, 8] blocks, where the
channel changes along a block: a prologue kernel writes the (3 or 5, C) coefficient table
and the element kernel gathers from it (L1 hits).

Bytes moved: read x (+ r or x2), write out: (2 or 3) * numel * itemsize, plus numel / 8 for the
mask and a few bytes per channel (flat mode: the table, 12 or 20 bytes per channel, written
once and read from L1/L2).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..checks import check_apply_args, check_dual_apply_args
from ._common import (
    elementwise_config,
    empty_like_working,
    launch_plan,
    like_input,
    per_channel,
    prepare_input,
    split_f64,
)
from ._jit import (
    channel_affine,
    flat_channel,
    join_f64,
    load_acc,
)
from ._launch import (
    device_guard,
    triton_op,
    wrap_triton,
)


@triton.jit
def _apply_coeffs(mean_ptr, var_ptr, w_ptr, b_ptr, mean2_ptr, var2_ptr, w2_ptr, b2_ptr, ch, cmask, eps, eps2,
                  HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, DUAL: tl.constexpr,
                  HAS_WEIGHT2: tl.constexpr, HAS_BIAS2: tl.constexpr, IS_F64: tl.constexpr):
    """Per-channel (mean, scale, shift, mean2, scale2) of
    y = (x - mean) * scale + shift [+ (x2 - mean2) * scale2]: the second BatchNorm's bias is
    folded into `shift` (mean2, scale2 repeat the first's without DUAL; unused)."""
    mean, scale, shift = channel_affine(mean_ptr, var_ptr, w_ptr, b_ptr, ch, cmask, eps,
                                        HAS_WEIGHT, HAS_BIAS, IS_F64)
    if DUAL:
        mean2, scale2, shift2 = channel_affine(mean2_ptr, var2_ptr, w2_ptr, b2_ptr, ch, cmask, eps2,
                                               HAS_WEIGHT2, HAS_BIAS2, IS_F64)
        shift = shift + shift2
    else:
        mean2 = mean
        scale2 = scale
    return mean, scale, shift, mean2, scale2


@triton.jit
def _apply_values(x_ptr, r_ptr, out_ptr, offs, valid, mean, scale, shift, mean2, scale2,
                  HAS_RESIDUAL: tl.constexpr, DUAL: tl.constexpr, IS_F64: tl.constexpr):
    """Computes and stores one block of `out` from its per-element coefficients; returns the
    pre-ReLU values y. With DUAL, `r_ptr` is the second input x2."""
    y = (load_acc(x_ptr, offs, valid, IS_F64) - mean) * scale + shift
    if DUAL:
        y = y + (load_acc(r_ptr, offs, valid, IS_F64) - mean2) * scale2
    elif HAS_RESIDUAL:
        y = y + load_acc(r_ptr, offs, valid, IS_F64)
    out = tl.where(y < 0, 0.0, y)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=valid)
    return y


@launch_plan("elementwise")
@triton.jit
def _apply_rows_kernel(
    x_ptr, r_ptr, out_ptr, mask_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, mean2_ptr, var2_ptr, w2_ptr, b2_ptr,
    ROWS, COLS8, C, col_blocks, eps_hi, eps_lo, eps2_hi, eps2_lo,
    NHWC: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    DUAL: tl.constexpr, HAS_WEIGHT2: tl.constexpr, HAS_BIAS2: tl.constexpr,
    SAVE_MASK: tl.constexpr, IS_F64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """Block [BLOCK_R rows, BLOCK_J bytes, 8 bits] of the (ROWS, 8 * COLS8) row matrix. The
    coefficients are computed once per row (NCHW) or column (NHWC) of the block."""
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
    mean, scale, shift, mean2, scale2 = _apply_coeffs(
        mean_ptr, var_ptr, w_ptr, b_ptr, mean2_ptr, var2_ptr, w2_ptr, b2_ptr, ch, cmask, eps, eps2,
        HAS_WEIGHT, HAS_BIAS, DUAL, HAS_WEIGHT2, HAS_BIAS2, IS_F64)
    y = _apply_values(x_ptr, r_ptr, out_ptr, offs, valid, mean, scale, shift, mean2, scale2,
                      HAS_RESIDUAL, DUAL, IS_F64)
    if SAVE_MASK:
        packed = tl.sum((y > 0).to(tl.int32) << bit[None, None, :], 2)
        tl.store(mask_ptr + row[:, None] * COLS8 + byte[None, :], packed.to(tl.uint8),
                 mask=row_ok[:, None] & byte_ok[None, :])


@launch_plan("per_channel")
@triton.jit
def _apply_coeffs_kernel(
    mean_ptr, var_ptr, w_ptr, b_ptr, mean2_ptr, var2_ptr, w2_ptr, b2_ptr, coef_ptr, C,
    eps_hi, eps_lo, eps2_hi, eps2_lo,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, DUAL: tl.constexpr, HAS_WEIGHT2: tl.constexpr,
    HAS_BIAS2: tl.constexpr, IS_F64: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The flat-mode prologue: rows (mean, scale, shift[, mean2, scale2]) of the (3 or 5, C)
    coefficient table, one sqrt and division per channel instead of per element."""
    ch = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = ch < C
    mean, scale, shift, mean2, scale2 = _apply_coeffs(
        mean_ptr, var_ptr, w_ptr, b_ptr, mean2_ptr, var2_ptr, w2_ptr, b2_ptr, ch, cmask,
        join_f64(eps_hi, eps_lo, IS_F64), join_f64(eps2_hi, eps2_lo, IS_F64),
        HAS_WEIGHT, HAS_BIAS, DUAL, HAS_WEIGHT2, HAS_BIAS2, IS_F64)
    tl.store(coef_ptr + ch, mean, mask=cmask)
    tl.store(coef_ptr + C + ch, scale, mask=cmask)
    tl.store(coef_ptr + 2 * C + ch, shift, mask=cmask)
    if DUAL:
        tl.store(coef_ptr + 3 * C + ch, mean2, mask=cmask)
        tl.store(coef_ptr + 4 * C + ch, scale2, mask=cmask)


@launch_plan("elementwise")
@triton.jit
def _apply_flat_kernel(
    x_ptr, r_ptr, out_ptr, mask_ptr, coef_ptr, numel, C, HW, c_inv, hw_inv,
    NHWC: tl.constexpr, HAS_RESIDUAL: tl.constexpr, DUAL: tl.constexpr, SAVE_MASK: tl.constexpr,
    IS_F64: tl.constexpr, FAST_DIV: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """Block [BLOCK_J bytes, 8 bits] of the flat memory order; per element, the channel's
    coefficients are gathered from the table of `_apply_coeffs_kernel` (L1-resident: C
    values per row) and y costs one subtraction and one multiply-add (two of each with DUAL)."""
    pid = tl.program_id(0)
    base = pid.to(tl.int64) * (BLOCK_J * 8)
    byte = tl.arange(0, BLOCK_J)
    bit = tl.arange(0, 8)
    local = byte[:, None] * 8 + bit[None, :]
    offs = base + local
    valid = offs < numel
    ch = flat_channel(base, local, C, HW, c_inv, hw_inv, NHWC, FAST_DIV)  # in [0, C) everywhere
    mean = tl.load(coef_ptr + ch)
    scale = tl.load(coef_ptr + C + ch)
    shift = tl.load(coef_ptr + 2 * C + ch)
    if DUAL:
        mean2 = tl.load(coef_ptr + 3 * C + ch)
        scale2 = tl.load(coef_ptr + 4 * C + ch)
    else:
        mean2 = mean
        scale2 = scale
    y = _apply_values(x_ptr, r_ptr, out_ptr, offs, valid, mean, scale, shift, mean2, scale2,
                      HAS_RESIDUAL, DUAL, IS_F64)
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
    if second is None:
        check_apply_args(input, residual, mean, var, weight, bias)
    else:
        check_dual_apply_args(input, mean, var, weight, bias, second.input, second.mean, second.var,
                              second.weight, second.bias)
    x, geo = prepare_input(input)
    r = None if residual is None else like_input(residual, geo)
    if second is not None:
        r = like_input(second.input, geo)
    out = empty_like_working(x, geo)
    nbytes = (geo.numel + 7) // 8 if save_mask else 0
    mask = torch.empty((nbytes,), dtype=torch.uint8, device=x.device)
    if geo.numel == 0:
        return out, mask
    cfg = elementwise_config(geo)
    # Absent optional tensors are replaced by an input the kernel never reads (its constexpr
    # flag is off), so no null pointers reach the launcher. Outputs are never stand-ins:
    # `out` and `mask` (empty when not saved) are each their own tensor.
    mean, var, weight, bias = (per_channel(t) for t in (mean, var, weight, bias))
    mean2, var2, weight2, bias2 = (None, None, None, None) if second is None else (
        per_channel(t) for t in (second.mean, second.var, second.weight, second.bias))
    channel_ptrs = tuple(mean if t is None else t
                         for t in (mean, var, weight, bias, mean2, var2, weight2, bias2))
    eps_args = (*split_f64(eps), *split_f64(eps if second is None else second.eps))
    coeff_flags = dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, DUAL=second is not None,
                       HAS_WEIGHT2=weight2 is not None, HAS_BIAS2=bias2 is not None, IS_F64=geo.is_f64)
    flags = dict(NHWC=geo.nhwc, HAS_RESIDUAL=residual is not None, DUAL=second is not None,
                 SAVE_MASK=save_mask, IS_F64=geo.is_f64)
    r = x if r is None else r
    with device_guard(x.device):
        if cfg.rows_mode:
            wrap_triton(_apply_rows_kernel)[cfg.grid](
                x, r, out, mask, *channel_ptrs, geo.rows, geo.cols // 8, geo.c, cfg.col_blocks, *eps_args,
                **{**coeff_flags, **flags}, BLOCK_R=cfg.block_r, BLOCK_J=cfg.block_j, num_warps=cfg.num_warps,
            )
        else:
            coef = torch.empty((5 if second is not None else 3, geo.c), dtype=geo.acc, device=x.device)
            block_c = min(1024, triton.next_power_of_2(geo.c))
            wrap_triton(_apply_coeffs_kernel)[(triton.cdiv(geo.c, block_c),)](
                *channel_ptrs, coef, geo.c, *eps_args, **coeff_flags, BLOCK_C=block_c, num_warps=4,
            )
            wrap_triton(_apply_flat_kernel)[cfg.grid](
                x, r, out, mask, coef, geo.numel, geo.c, geo.hw, 1.0 / geo.c, 1.0 / geo.hw,
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
