"""`triton_bn_backward_reduce` and `triton_bn_backward_apply`.

With dy = grad_out * bit(mask) (the gradient of the pre-ReLU sum y; `where(bit, g, 0)`, so
a NaN gradient behind a zero bit gives 0, as `threshold_backward` does):

bn_backward_reduce, per channel c, in fp32 (fp64 for fp64 input):
    sum_dy_c      = sum(dy)
    sum_dy_xmu_c  = sum(dy * (x - mean_c))
    grad_weight_c = sum_dy_xmu_c / sqrt(var_c + eps)
  `_reduce_partial_{nchw,nhwc}_kernel` use the tiling of the bn_stats kernels (a fixed
  range of tiles per program); every lane accumulates in fp32 with Kahan compensation
  (a few flops per element, free in a memory-bound loop) and the lanes of a program are
  added in float64 into two (S, C) float64 partials; `_reduce_merge_kernel` adds the S
  partials of a channel in chunks, in a fixed order, and rounds once. The sums are then
  about as accurate as the per-element products themselves (a plain fp32 tree over ~10^4
  values per channel loses a few more ulps on cancelling sums), and, with no float atomics
  anywhere, bitwise reproducible for a shape and device.
  Mask bits are read per element: byte e >> 3, bit e & 7 (the 8 lanes of a byte hit the
  same cache line). Bytes: read grad_out and x (2 * numel * itemsize) + numel / 8 of mask.

bn_backward_apply, per element:
    grad_residual = dy                                    (input dtype, exact)
    grad_input    = w_c invstd_c (dy - sum_dy_c / count
                                  - (x - mean_c) invstd_c^2 sum_dy_xmu_c / count)  training
                  = dy w_c invstd_c                                              eval
  computed as k_c dy - (a_c (x - mean_c) + b_c) from per-channel k_c = w_c invstd_c,
  a_c = k_c invstd_c^2 sum_dy_xmu_c / count, b_c = k_c sum_dy_c / count (one subtraction
  and two multiply-adds per element), with the element-wise tiling of bn_apply ("rows"
  blocks [BLOCK_R, BLOCK_J, 8], coefficients once per row / column of a block; or "flat"
  blocks [BLOCK_J, 8], coefficients gathered from the (1 or 4, C) table a prologue kernel
  writes, see apply.py): a block loads each mask byte once and expands it with a shift.
  Bytes: read grad_out (+ x in training) + numel / 8 of mask, write grad_input and/or
  grad_residual.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..checks import check_backward_apply_args, check_backward_reduce_args
from ._common import (
    elementwise_config,
    empty_like_working,
    launch_plan,
    like_input,
    merge_blocks,
    per_channel,
    prepare_input,
    reduce_config,
    split_f64,
)
from ._jit import (
    div_rn,
    flat_channel,
    join_f64,
    load_acc,
    nchw_tile,
    nhwc_tile,
    partials_chunk,
    rstd,
    to_acc,
)
from ._launch import (
    device_guard,
    triton_op,
    wrap_triton,
)

# --------------------------------------------------------------------------------------
# bn_backward_reduce
# --------------------------------------------------------------------------------------


@triton.jit
def _masked_grad(g_ptr, mask_ptr, offs, valid, IS_F64: tl.constexpr):
    """dy = grad_out where the mask bit of element `offs` is set, else 0 (acc dtype)."""
    packed = tl.load(mask_ptr + (offs >> 3), mask=valid, other=0).to(tl.int32)
    bit = (packed >> (offs & 7).to(tl.int32)) & 1
    g = load_acc(g_ptr, offs, valid, IS_F64)
    return tl.where(bit != 0, g, 0.0)


@triton.jit
def _kahan_add(total, comp, v):
    """total + v with Kahan's compensation (comp holds the rounding error still owed)."""
    y = v - comp
    t = total + y
    comp = (t - total) - y
    return t, comp


@triton.jit
def _lanes_sum_f64(total, comp):
    """Sum of the compensated lane accumulators of a [A, B] tile over A, in float64."""
    return tl.sum(total.to(tl.float64) - comp.to(tl.float64), 0)


@launch_plan("reduce")
@triton.jit
def _reduce_partial_nchw_kernel(
    g_ptr, mask_ptr, x_ptr, mean_ptr, sdy_ptr, sdyx_ptr, N, C, HW, n_tiles, tiles_hw, tiles_per_program,
    IS_F64: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """Program (c, s): same tiles as `_stats_partial_nchw_kernel`."""
    ACC: tl.constexpr = tl.float64 if IS_F64 else tl.float32
    c = tl.program_id(0)
    s = tl.program_id(1)
    chan = c.to(tl.int64) * HW
    mean = to_acc(tl.load(mean_ptr + c), IS_F64)
    rn = tl.arange(0, BLOCK_N)[:, None]
    rhw = tl.arange(0, BLOCK_HW)[None, :]
    acc_dy = tl.zeros([BLOCK_N, BLOCK_HW], dtype=ACC)
    acc_dyx = tl.zeros([BLOCK_N, BLOCK_HW], dtype=ACC)
    comp_dy = tl.zeros([BLOCK_N, BLOCK_HW], dtype=ACC)
    comp_dyx = tl.zeros([BLOCK_N, BLOCK_HW], dtype=ACC)
    t_begin = s * tiles_per_program
    t_end = tl.minimum(t_begin + tiles_per_program, n_tiles)
    for t in range(t_begin, t_end):
        offs, valid = nchw_tile(t, tiles_hw, rn, rhw, N, C, HW, chan, BLOCK_N, BLOCK_HW)
        dy = _masked_grad(g_ptr, mask_ptr, offs, valid, IS_F64)
        acc_dy, comp_dy = _kahan_add(acc_dy, comp_dy, dy)
        acc_dyx, comp_dyx = _kahan_add(acc_dyx, comp_dyx, dy * (load_acc(x_ptr, offs, valid, IS_F64) - mean))
    out = s.to(tl.int64) * C + c
    tl.store(sdy_ptr + out, tl.sum(_lanes_sum_f64(acc_dy, comp_dy), 0))
    tl.store(sdyx_ptr + out, tl.sum(_lanes_sum_f64(acc_dyx, comp_dyx), 0))


@launch_plan("reduce")
@triton.jit
def _reduce_partial_nhwc_kernel(
    g_ptr, mask_ptr, x_ptr, mean_ptr, sdy_ptr, sdyx_ptr, M, C, n_tiles, tiles_per_program,
    IS_F64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Program (cb, s): same tiles as `_stats_partial_nhwc_kernel`."""
    ACC: tl.constexpr = tl.float64 if IS_F64 else tl.float32
    cb = tl.program_id(0)
    s = tl.program_id(1)
    ch = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = ch < C
    mean = load_acc(mean_ptr, ch, cmask, IS_F64)[None, :]
    rm = tl.arange(0, BLOCK_M)[:, None]
    acc_dy = tl.zeros([BLOCK_M, BLOCK_C], dtype=ACC)
    acc_dyx = tl.zeros([BLOCK_M, BLOCK_C], dtype=ACC)
    comp_dy = tl.zeros([BLOCK_M, BLOCK_C], dtype=ACC)
    comp_dyx = tl.zeros([BLOCK_M, BLOCK_C], dtype=ACC)
    t_begin = s * tiles_per_program
    t_end = tl.minimum(t_begin + tiles_per_program, n_tiles)
    for t in range(t_begin, t_end):
        offs, valid = nhwc_tile(t, rm, ch, cmask, M, C, BLOCK_M)
        dy = _masked_grad(g_ptr, mask_ptr, offs, valid, IS_F64)
        acc_dy, comp_dy = _kahan_add(acc_dy, comp_dy, dy)
        acc_dyx, comp_dyx = _kahan_add(acc_dyx, comp_dyx, dy * (load_acc(x_ptr, offs, valid, IS_F64) - mean))
    out = s.to(tl.int64) * C + ch
    tl.store(sdy_ptr + out, _lanes_sum_f64(acc_dy, comp_dy), mask=cmask)
    tl.store(sdyx_ptr + out, _lanes_sum_f64(acc_dyx, comp_dyx), mask=cmask)


@launch_plan("per_channel")
@triton.jit
def _reduce_merge_kernel(
    part_dy_ptr, part_dyx_ptr, var_ptr, sdy_ptr, sdyx_ptr, gw_ptr, C, S, eps_hi, eps_lo,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Sums the float64 partials of BLOCK_C channels: chunks of BLOCK_S partials (a tree
    sum) in the order s = 0, BLOCK_S, ... (a fixed order for a given S); results are rounded
    once to the statistics dtype."""
    ch = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = ch < C
    rs = tl.arange(0, BLOCK_S)[:, None]
    sdy = tl.zeros([BLOCK_C], dtype=tl.float64)
    sdyx = tl.zeros([BLOCK_C], dtype=tl.float64)
    for s0 in range(0, S, BLOCK_S):
        offs, valid = partials_chunk(s0, rs, S, C, ch, cmask)
        sdy += tl.sum(tl.load(part_dy_ptr + offs, mask=valid, other=0.0), 0)
        sdyx += tl.sum(tl.load(part_dyx_ptr + offs, mask=valid, other=0.0), 0)
    invstd = rstd(load_acc(var_ptr, ch, cmask, True), join_f64(eps_hi, eps_lo, True))
    tl.store(sdy_ptr + ch, sdy.to(sdy_ptr.dtype.element_ty), mask=cmask)
    tl.store(sdyx_ptr + ch, sdyx.to(sdyx_ptr.dtype.element_ty), mask=cmask)
    tl.store(gw_ptr + ch, (sdyx * invstd).to(gw_ptr.dtype.element_ty), mask=cmask)


def _launch_backward_reduce(
    grad_out: Tensor, mask: Tensor, input: Tensor, mean: Tensor, var: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    check_backward_reduce_args(grad_out, mask, input, mean, var)
    x, geo = prepare_input(input)
    g = like_input(grad_out, geo)
    mean, var = per_channel(mean), per_channel(var)
    sum_dy, sum_dy_xmu, grad_weight = (
        torch.empty((geo.c,), dtype=geo.acc, device=x.device) for _ in range(3)
    )
    if geo.c == 0:
        return sum_dy, sum_dy_xmu, grad_weight
    cfg = reduce_config(geo, x.device)
    # (sum dy, sum dy * (x - mean)) of every (split, channel), in float64 (see the docstring):
    # two tensors, not two views of one, as every kernel output is its own tensor.
    part_dy, part_dyx = (torch.empty((cfg.splits, geo.c), dtype=torch.float64, device=x.device)
                         for _ in range(2))
    block_s, block_c = merge_blocks(geo.c, cfg.splits)
    with device_guard(x.device):
        if geo.nhwc:
            wrap_triton(_reduce_partial_nhwc_kernel)[cfg.grid](
                g, mask, x, mean, part_dy, part_dyx, geo.rows, geo.c, cfg.n_tiles, cfg.tiles_per_program,
                IS_F64=geo.is_f64, BLOCK_M=cfg.block_a, BLOCK_C=cfg.block_b, num_warps=cfg.num_warps,
            )
        else:
            wrap_triton(_reduce_partial_nchw_kernel)[cfg.grid](
                g, mask, x, mean, part_dy, part_dyx, geo.n, geo.c, geo.hw, cfg.n_tiles, cfg.tiles_b,
                cfg.tiles_per_program,
                IS_F64=geo.is_f64, BLOCK_N=cfg.block_a, BLOCK_HW=cfg.block_b, num_warps=cfg.num_warps,
            )
        wrap_triton(_reduce_merge_kernel)[(triton.cdiv(geo.c, block_c),)](
            part_dy, part_dyx, var, sum_dy, sum_dy_xmu, grad_weight, geo.c, cfg.splits, *split_f64(eps),
            BLOCK_S=block_s, BLOCK_C=block_c, num_warps=4,
        )
    return sum_dy, sum_dy_xmu, grad_weight


@triton_op(
    "fused_residual::triton_bn_backward_reduce",
    mutates_args=(),
    schema="(Tensor grad_out, Tensor mask, Tensor input, Tensor mean, Tensor var, float eps) "
    "-> (Tensor sum_dy, Tensor sum_dy_xmu, Tensor grad_weight)",
)
def triton_bn_backward_reduce(
    grad_out: Tensor, mask: Tensor, input: Tensor, mean: Tensor, var: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel sum(dy), sum(dy * (x - mean)) and grad_weight = sum_dy_xmu * invstd."""
    return _launch_backward_reduce(grad_out, mask, input, mean, var, eps)


# --------------------------------------------------------------------------------------
# bn_backward_apply
# --------------------------------------------------------------------------------------


@triton.jit
def _backward_coeffs(mean_ptr, var_ptr, w_ptr, sdy_ptr, sdyx_ptr, ch, cmask, eps, count,
                     HAS_WEIGHT: tl.constexpr, TRAINING: tl.constexpr, IS_F64: tl.constexpr):
    """Per-channel (k, mean, a, b) of grad_input = k * dy - (a * (x - mean) + b):
    k = w * invstd, and in training a = k * invstd^2 * sum_dy_xmu / count,
    b = k * sum_dy / count (mean, a, b repeat k in eval; unused)."""
    invstd = rstd(load_acc(var_ptr, ch, cmask, IS_F64), eps)
    k = invstd
    if HAS_WEIGHT:
        k = load_acc(w_ptr, ch, cmask, IS_F64) * invstd
    if TRAINING:
        mean = load_acc(mean_ptr, ch, cmask, IS_F64)
        a = k * (invstd * invstd) * div_rn(load_acc(sdyx_ptr, ch, cmask, IS_F64), count)
        b = k * div_rn(load_acc(sdy_ptr, ch, cmask, IS_F64), count)
    else:
        mean = k
        a = k
        b = k
    return k, mean, a, b


@triton.jit
def _backward_values(g_ptr, x_ptr, gi_ptr, gr_ptr, offs, valid, bits, k, mean, a, b,
                     TRAINING: tl.constexpr, NEED_GI: tl.constexpr, NEED_GR: tl.constexpr,
                     IS_F64: tl.constexpr):
    """One block of grad_residual = dy and grad_input from per-element coefficients."""
    g = tl.load(g_ptr + offs, mask=valid, other=0.0)
    dy = tl.where(bits != 0, g, tl.zeros_like(g))
    if NEED_GR:
        tl.store(gr_ptr + offs, dy.to(gr_ptr.dtype.element_ty), mask=valid)
    if NEED_GI:
        dy = to_acc(dy, IS_F64)
        if TRAINING:
            xmu = load_acc(x_ptr, offs, valid, IS_F64) - mean
            gi = k * dy - (a * xmu + b)
        else:
            gi = k * dy
        tl.store(gi_ptr + offs, gi.to(gi_ptr.dtype.element_ty), mask=valid)


@launch_plan("elementwise")
@triton.jit
def _backward_apply_rows_kernel(
    g_ptr, mask_ptr, x_ptr, mean_ptr, var_ptr, w_ptr, sdy_ptr, sdyx_ptr, gi_ptr, gr_ptr,
    ROWS, COLS8, C, col_blocks, eps_hi, eps_lo, count,
    NHWC: tl.constexpr, HAS_WEIGHT: tl.constexpr, TRAINING: tl.constexpr, NEED_GI: tl.constexpr,
    NEED_GR: tl.constexpr, IS_F64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """Block [BLOCK_R rows, BLOCK_J bytes, 8 bits] of the (ROWS, 8 * COLS8) row matrix; the
    coefficients are computed once per row (NCHW) or column (NHWC) of the block."""
    pid = tl.program_id(0)
    pid_r = pid // col_blocks
    pid_c = pid - pid_r * col_blocks
    row = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    byte = pid_c * BLOCK_J + tl.arange(0, BLOCK_J)
    bit = tl.arange(0, 8)
    col = byte[None, :, None] * 8 + bit[None, None, :]
    row_ok = row < ROWS
    byte_ok = byte < COLS8
    byte_valid = row_ok[:, None] & byte_ok[None, :]
    valid = byte_valid[:, :, None]
    offs = row[:, None, None] * (COLS8 * 8) + col
    packed = tl.load(mask_ptr + row[:, None] * COLS8 + byte[None, :], mask=byte_valid, other=0)
    bits = (packed.to(tl.int32)[:, :, None] >> bit[None, None, :]) & 1
    if NHWC:
        ch = col
        cmask = byte_ok[None, :, None]
    else:
        ch = (row % C).to(tl.int32)[:, None, None]
        cmask = row_ok[:, None, None]
    if NEED_GI:
        k, mean, a, b = _backward_coeffs(mean_ptr, var_ptr, w_ptr, sdy_ptr, sdyx_ptr, ch, cmask,
                                         join_f64(eps_hi, eps_lo, IS_F64), count, HAS_WEIGHT, TRAINING,
                                         IS_F64)
    else:  # unused
        k, mean, a, b = 0.0, 0.0, 0.0, 0.0
    _backward_values(g_ptr, x_ptr, gi_ptr, gr_ptr, offs, valid, bits, k, mean, a, b,
                     TRAINING, NEED_GI, NEED_GR, IS_F64)


@launch_plan("per_channel")
@triton.jit
def _backward_coeffs_kernel(
    mean_ptr, var_ptr, w_ptr, sdy_ptr, sdyx_ptr, coef_ptr, C, eps_hi, eps_lo, count,
    HAS_WEIGHT: tl.constexpr, TRAINING: tl.constexpr, IS_F64: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The flat-mode prologue: rows (k[, mean, a, b]) of the (1 or 4, C) coefficient table."""
    ch = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = ch < C
    k, mean, a, b = _backward_coeffs(mean_ptr, var_ptr, w_ptr, sdy_ptr, sdyx_ptr, ch, cmask,
                                     join_f64(eps_hi, eps_lo, IS_F64), count, HAS_WEIGHT, TRAINING, IS_F64)
    tl.store(coef_ptr + ch, k, mask=cmask)
    if TRAINING:
        tl.store(coef_ptr + C + ch, mean, mask=cmask)
        tl.store(coef_ptr + 2 * C + ch, a, mask=cmask)
        tl.store(coef_ptr + 3 * C + ch, b, mask=cmask)


@launch_plan("elementwise")
@triton.jit
def _backward_apply_flat_kernel(
    g_ptr, mask_ptr, x_ptr, coef_ptr, gi_ptr, gr_ptr, numel, C, HW, c_inv, hw_inv,
    NHWC: tl.constexpr, TRAINING: tl.constexpr, NEED_GI: tl.constexpr, NEED_GR: tl.constexpr,
    IS_F64: tl.constexpr, FAST_DIV: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """Block [BLOCK_J bytes, 8 bits] of the flat memory order; the coefficients of each
    element's channel are gathered from the table of `_backward_coeffs_kernel`."""
    pid = tl.program_id(0)
    base = pid.to(tl.int64) * (BLOCK_J * 8)
    byte = tl.arange(0, BLOCK_J)
    bit = tl.arange(0, 8)
    local = byte[:, None] * 8 + bit[None, :]
    offs = base + local
    valid = offs < numel
    byte_idx = pid.to(tl.int64) * BLOCK_J + byte
    packed = tl.load(mask_ptr + byte_idx, mask=byte_idx < (numel + 7) // 8, other=0)
    bits = (packed.to(tl.int32)[:, None] >> bit[None, :]) & 1
    if NEED_GI:
        ch = flat_channel(base, local, C, HW, c_inv, hw_inv, NHWC, FAST_DIV)  # in [0, C) everywhere
        k = tl.load(coef_ptr + ch)
        if TRAINING:
            mean = tl.load(coef_ptr + C + ch)
            a = tl.load(coef_ptr + 2 * C + ch)
            b = tl.load(coef_ptr + 3 * C + ch)
        else:
            mean = k
            a = k
            b = k
    else:  # unused
        k, mean, a, b = 0.0, 0.0, 0.0, 0.0
    _backward_values(g_ptr, x_ptr, gi_ptr, gr_ptr, offs, valid, bits, k, mean, a, b,
                     TRAINING, NEED_GI, NEED_GR, IS_F64)


def _launch_backward_apply(
    grad_out: Tensor, mask: Tensor, input: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None,
    sum_dy: Tensor | None, sum_dy_xmu: Tensor | None, eps: float, count: int,
    need_grad_input: bool, need_grad_residual: bool,
) -> tuple[Tensor, Tensor]:
    check_backward_apply_args(grad_out, mask, input, mean, var, weight, sum_dy, sum_dy_xmu, count)
    x, geo = prepare_input(input)
    g = like_input(grad_out, geo)
    mean, var, weight, sum_dy, sum_dy_xmu = (per_channel(t) for t in (mean, var, weight, sum_dy, sum_dy_xmu))
    grad_input = empty_like_working(x, geo) if need_grad_input else x.new_empty((0,))
    grad_residual = empty_like_working(x, geo) if need_grad_residual else x.new_empty((0,))
    if geo.numel == 0 or not (need_grad_input or need_grad_residual):
        return grad_input, grad_residual
    cfg = elementwise_config(geo)
    training = sum_dy is not None
    # Inputs for absent arguments are stand-ins the kernel never reads (constexpr flags); each
    # output is its own tensor (empty when not wanted), never a stand-in for another.
    channel_ptrs = (mean, var, mean if weight is None else weight, sum_dy if training else mean,
                    sum_dy_xmu if training else mean)
    eps_args = split_f64(eps)
    flags = dict(NHWC=geo.nhwc, TRAINING=training, NEED_GI=need_grad_input, NEED_GR=need_grad_residual,
                 IS_F64=geo.is_f64)
    with device_guard(x.device):
        if cfg.rows_mode:
            wrap_triton(_backward_apply_rows_kernel)[cfg.grid](
                g, mask, x, *channel_ptrs, grad_input, grad_residual, geo.rows, geo.cols // 8, geo.c,
                cfg.col_blocks, *eps_args, count,
                **flags, HAS_WEIGHT=weight is not None, BLOCK_R=cfg.block_r, BLOCK_J=cfg.block_j,
                num_warps=cfg.num_warps,
            )
        else:
            coef = torch.empty((4 if training else 1, geo.c), dtype=geo.acc, device=x.device)
            if need_grad_input:
                block_c = min(1024, triton.next_power_of_2(geo.c))
                wrap_triton(_backward_coeffs_kernel)[(triton.cdiv(geo.c, block_c),)](
                    *channel_ptrs, coef, geo.c, *eps_args, count, HAS_WEIGHT=weight is not None,
                    TRAINING=training, IS_F64=geo.is_f64, BLOCK_C=block_c, num_warps=4,
                )
            wrap_triton(_backward_apply_flat_kernel)[cfg.grid](
                g, mask, x, coef, grad_input, grad_residual, geo.numel, geo.c, geo.hw, 1.0 / geo.c,
                1.0 / geo.hw, **flags, FAST_DIV=cfg.fast_div, BLOCK_J=cfg.block_j, num_warps=cfg.num_warps,
            )
    return grad_input, grad_residual


@triton_op(
    "fused_residual::triton_bn_backward_apply",
    mutates_args=(),
    schema="(Tensor grad_out, Tensor mask, Tensor input, Tensor mean, Tensor var, Tensor? weight, "
    "Tensor? sum_dy, Tensor? sum_dy_xmu, float eps, int count, bool need_grad_input, "
    "bool need_grad_residual) -> (Tensor grad_input, Tensor grad_residual)",
)
def triton_bn_backward_apply(
    grad_out: Tensor,
    mask: Tensor,
    input: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    sum_dy: Tensor | None,
    sum_dy_xmu: Tensor | None,
    eps: float,
    count: int,
    need_grad_input: bool,
    need_grad_residual: bool,
) -> tuple[Tensor, Tensor]:
    """grad_residual = dy and grad_input of the batch-norm (training when sum_dy and
    sum_dy_xmu are given, eval otherwise), in the working layout; empty when not needed."""
    return _launch_backward_apply(grad_out, mask, input, mean, var, weight, sum_dy, sum_dy_xmu, eps,
                                  count, need_grad_input, need_grad_residual)
