"""`triton_bn_stats` and `triton_bn_update_running_stats`.

bn_stats: per channel c, over the N*H*W values x of that channel,

    mean_c = sum(x) / count,    var_c = sum((x - mean_c)^2) / count    (biased)

accumulated in fp32 (fp64 for fp64 input), deterministic and numerically stable:

1. `_stats_partial_{nchw,nhwc}_kernel`, grid (channel groups, S): every program walks a
   fixed range of tiles of its channel(s) and runs Welford's update independently in every
   lane, on values shifted by a per-channel pilot K_c = x[0, c, 0, 0]. The shift keeps the
   running means small, so a channel with a mean offset of 1e4 and std 1 does not lose the
   ~3 decimal digits that plain fp32 Welford loses to rounding of the running mean. The
   lanes are then merged with the pairwise-group formula of Chan, Golub & LeVeque
   ("Updating formulae and a pairwise algorithm for computing sample variances", 1979):
   n = sum n_i, m = sum n_i m_i / n, M2 = sum (M2_i + n_i (m_i - m)^2), and the program
   writes one (n, m - K, M2) per channel into partials of shape (3, S, C).
2. `_stats_merge_kernel`, one program per block of channels: the group formula above over
   the S partials, as two passes in chunks of BLOCK_S in the order of s (a fixed order, so
   the result is bitwise reproducible): sum n_i m_i, then m and M2. Every channel has
   n = count = N*H*W values: m = sum n_i m_i / count, var = M2 / count, mean = K + m. In
   float64 the two divisions multiply by 1 / count rounded on the host (a float64 division
   is a call that made ptxas spill; the product is within 1 ulp of the quotient). A
   channel whose mean comes out non-finite (it holds a +-inf or NaN) is summed again in
   fp64 as nn.BatchNorm2d does on CPU (`_exact_moments`), so its mean is +-inf or NaN as
   there; finite channels never take that branch.

Never E[x^2] - E[x]^2. The tiling follows the Triton layer-norm tutorial (a 2-D block per
loop step, accumulators kept per lane and reduced once at the end).

Bytes moved: numel * itemsize read once, plus 3*S*C accumulators written and read, plus
2*C written (S is a few programs per SM divided by the number of channel groups).

bn_update_running_stats: one tiny element-wise kernel over C, in the statistics dtype,
stored in the running stats' dtype:
    running_mean = (1 - momentum) * running_mean + momentum * mean
    running_var  = (1 - momentum) * running_var + momentum * var * count / (count - 1)
Bytes: 4 * C values read, 2 * C written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..checks import check_stats_args, check_update_running_stats_args
from ..reference import acc_dtype
from ._common import (
    TUNING,
    launch_plan,
    merge_blocks,
    prepare_input,
    reduce_config,
    split_f64,
)
from ._jit import (
    div_rn,
    join3_f64,
    join_f64,
    load_acc,
    nchw_tile,
    nhwc_tile,
    partials_chunk,
    store_rounded,
    to_acc,
)
from ._launch import (
    device_guard,
    triton_op,
    wrap_triton,
)

# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _welford_step(d, valid, cnt, mean, m2):
    """Welford's update, lane-wise, with `valid` lanes taking one new value `d`."""
    cnt = cnt + valid.to(cnt.dtype)
    delta = tl.where(valid, d - mean, 0.0)
    mean = mean + div_rn(delta, tl.maximum(cnt, 1.0))
    m2 = m2 + delta * (d - mean)
    return cnt, mean, m2


@triton.jit
def _welford_lanes(cnt, mean, m2, AXIS: tl.constexpr):
    """Merge lanes along AXIS: (n, m, M2) of the union of the groups (Chan et al.)."""
    n = tl.sum(cnt, AXIS)
    m = div_rn(tl.sum(cnt * mean, AXIS), tl.maximum(n, 1.0))
    d = mean - tl.expand_dims(m, AXIS)
    m2 = tl.sum(m2 + cnt * d * d, AXIS)
    return n, m, m2


@launch_plan("reduce")
@triton.jit
def _stats_partial_nchw_kernel(
    x_ptr, cnt_ptr, mean_ptr, m2_ptr, N, C, HW, n_tiles, tiles_hw, tiles_per_program,
    IS_F64: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """Program (c, s): tiles [BLOCK_N rows n, BLOCK_HW contiguous hw] of channel c, tile
    indices [s * tiles_per_program, ...) with t -> (t // tiles_hw, t % tiles_hw)."""
    ACC: tl.constexpr = tl.float64 if IS_F64 else tl.float32
    c = tl.program_id(0)
    s = tl.program_id(1)
    chan = c.to(tl.int64) * HW
    shift = to_acc(tl.load(x_ptr + chan), IS_F64)  # x[0, c, 0, 0]
    rn = tl.arange(0, BLOCK_N)[:, None]
    rhw = tl.arange(0, BLOCK_HW)[None, :]
    cnt = tl.zeros([BLOCK_N, BLOCK_HW], dtype=ACC)
    mean = tl.zeros([BLOCK_N, BLOCK_HW], dtype=ACC)
    m2 = tl.zeros([BLOCK_N, BLOCK_HW], dtype=ACC)
    t_begin = s * tiles_per_program
    t_end = tl.minimum(t_begin + tiles_per_program, n_tiles)
    for t in range(t_begin, t_end):
        offs, valid = nchw_tile(t, tiles_hw, rn, rhw, N, C, HW, chan, BLOCK_N, BLOCK_HW)
        d = load_acc(x_ptr, offs, valid, IS_F64) - shift
        cnt, mean, m2 = _welford_step(d, valid, cnt, mean, m2)
    cnt, mean, m2 = _welford_lanes(cnt, mean, m2, 1)
    cnt, mean, m2 = _welford_lanes(cnt, mean, m2, 0)
    out = s.to(tl.int64) * C + c
    tl.store(cnt_ptr + out, cnt)
    tl.store(mean_ptr + out, mean)
    tl.store(m2_ptr + out, m2)


@launch_plan("reduce")
@triton.jit
def _stats_partial_nhwc_kernel(
    x_ptr, cnt_ptr, mean_ptr, m2_ptr, M, C, n_tiles, tiles_per_program,
    IS_F64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Program (cb, s): tiles [BLOCK_M rows of the (N*HW, C) matrix, BLOCK_C contiguous
    channels], rows [t * BLOCK_M, ...) for t in [s * tiles_per_program, ...)."""
    ACC: tl.constexpr = tl.float64 if IS_F64 else tl.float32
    cb = tl.program_id(0)
    s = tl.program_id(1)
    ch = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = ch < C
    shift = load_acc(x_ptr, ch, cmask, IS_F64)[None, :]  # x[0, c, 0, 0] (row 0)
    rm = tl.arange(0, BLOCK_M)[:, None]
    cnt = tl.zeros([BLOCK_M, BLOCK_C], dtype=ACC)
    mean = tl.zeros([BLOCK_M, BLOCK_C], dtype=ACC)
    m2 = tl.zeros([BLOCK_M, BLOCK_C], dtype=ACC)
    t_begin = s * tiles_per_program
    t_end = tl.minimum(t_begin + tiles_per_program, n_tiles)
    for t in range(t_begin, t_end):
        offs, valid = nhwc_tile(t, rm, ch, cmask, M, C, BLOCK_M)
        d = load_acc(x_ptr, offs, valid, IS_F64) - shift
        cnt, mean, m2 = _welford_step(d, valid, cnt, mean, m2)
    cnt, mean, m2 = _welford_lanes(cnt, mean, m2, 0)
    out = s.to(tl.int64) * C + ch
    tl.store(cnt_ptr + out, cnt, mask=cmask)
    tl.store(mean_ptr + out, mean, mask=cmask)
    tl.store(m2_ptr + out, m2, mask=cmask)


@triton.jit
def _per_count(v, count, inv_count, IS_F64: tl.constexpr):
    """v / count: an IEEE division in fp32, a product with the host's 1 / count in fp64."""
    if IS_F64:
        return v * inv_count
    else:
        return div_rn(v, count)


@triton.jit
def _channel_sums(x_ptr, chan, bad, N, HW, plane, j_stride, center, SQUARE: tl.constexpr,
                  BLOCK_J: tl.constexpr):
    """Per `bad` channel, in fp64: sum(x - center), or with SQUARE sum((x - center)^2), over
    n < N, j < HW, the element (n, c, j) being at x_ptr + chan_c + n*plane + j*j_stride."""
    rj = tl.arange(0, BLOCK_J)[:, None]
    total = tl.zeros(center.shape, dtype=tl.float64)
    ptrs = x_ptr + chan
    for _ in range(N):
        for j0 in range(0, HW, BLOCK_J):
            j = j0 + rj
            valid = (j < HW) & bad[None, :]
            d = tl.load(ptrs + j * j_stride, mask=valid, other=0.0).to(tl.float64) - center[None, :]
            if SQUARE:
                d = d * d
            total += tl.sum(tl.where(valid, d, 0.0), 0)
        ptrs += plane
    return total


@triton.jit
def _exact_moments(x_ptr, ch, bad, N, C, HW, shift_stride, j_stride, inv_count,
                   BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr):
    """The rare path of `_stats_merge_kernel`, for the `bad` channels, whose merged mean is
    not finite: they hold a +-inf or NaN (or x - K overflowed), and shifted Welford sums
    cannot tell +inf alone from +inf and -inf (both reach inf - inf = NaN). Summed again in
    fp64 as nn.BatchNorm2d does on CPU: mean = sum(x) / count, var = sum((x - mean)^2) /
    count. So +inf among finite values gives mean +inf, -inf gives -inf, NaN or both
    infinities NaN, and var is NaN. Element (n, c, j) is at n*C*HW + c*shift_stride +
    j*j_stride (NCHW: j_stride 1; NHWC: C). Two reads of those channels."""
    chan = ch.to(tl.int64)[None, :] * shift_stride
    plane = C * HW  # one sample's elements (N*C*HW may pass 2^31, C*HW does not)
    zero = tl.zeros([BLOCK_C], dtype=tl.float64)
    mean = _channel_sums(x_ptr, chan, bad, N, HW, plane, j_stride, zero, False, BLOCK_J) * inv_count
    sq = _channel_sums(x_ptr, chan, bad, N, HW, plane, j_stride, mean, True, BLOCK_J)
    return mean, sq * inv_count


@launch_plan("per_channel")
@triton.jit
def _stats_merge_kernel(
    x_ptr, cnt_ptr, part_mean_ptr, m2_ptr, mean_ptr, var_ptr, C, S, shift_stride, count, inv_count_hi,
    inv_count_mid, inv_count_lo, N, HW, j_stride,
    IS_F64: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """Merge the S partials (n_i, m_i, M2_i) of BLOCK_C channels with the group formula,
    in two passes over chunks of BLOCK_S partials in the order s = 0, BLOCK_S, ...:
    m = sum n_i m_i / count, then M2 = sum (M2_i + n_i (m_i - m)^2). Channels whose mean is
    not finite take `_exact_moments` (N, HW, j_stride: the input's geometry), in tiles of
    BLOCK_J values of BLOCK_C channels."""
    ACC: tl.constexpr = tl.float64 if IS_F64 else tl.float32
    ch = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = ch < C
    rs = tl.arange(0, BLOCK_S)[:, None]
    inv_count = join3_f64(inv_count_hi, inv_count_mid, inv_count_lo, IS_F64)
    s1 = tl.zeros([BLOCK_C], dtype=ACC)
    for s0 in range(0, S, BLOCK_S):
        offs, valid = partials_chunk(s0, rs, S, C, ch, cmask)
        s1 += tl.sum(load_acc(cnt_ptr, offs, valid, IS_F64) * load_acc(part_mean_ptr, offs, valid, IS_F64), 0)
    m = _per_count(s1, count, inv_count, IS_F64)
    q = tl.zeros([BLOCK_C], dtype=ACC)
    for s0 in range(0, S, BLOCK_S):
        offs, valid = partials_chunk(s0, rs, S, C, ch, cmask)
        d = load_acc(part_mean_ptr, offs, valid, IS_F64) - m[None, :]
        q += tl.sum(load_acc(m2_ptr, offs, valid, IS_F64) + load_acc(cnt_ptr, offs, valid, IS_F64) * d * d, 0)
    shift = load_acc(x_ptr, ch.to(tl.int64) * shift_stride, cmask, IS_F64)
    mean = shift + m
    var = _per_count(q, count, inv_count, IS_F64)
    bad = cmask & ~(tl.abs(mean) < float("inf"))
    if tl.sum(bad.to(tl.int32), 0) > 0:
        exact_mean, exact_var = _exact_moments(
            x_ptr, ch, bad, N, C, HW, shift_stride, j_stride,
            join3_f64(inv_count_hi, inv_count_mid, inv_count_lo, True), BLOCK_J, BLOCK_C,
        )
        mean = tl.where(bad, exact_mean.to(ACC), mean)
        var = tl.where(bad, exact_var.to(ACC), var)
    tl.store(mean_ptr + ch, mean, mask=cmask)
    tl.store(var_ptr + ch, var, mask=cmask)


@launch_plan("per_channel")
@triton.jit
def _update_running_stats_kernel(
    mean_ptr, var_ptr, rm_ptr, rv_ptr, C, rm_stride, rv_stride,
    mom_hi, mom_lo, keep_hi, keep_lo, unbias_hi, unbias_lo,
    IS_F64: tl.constexpr, BLOCK_C: tl.constexpr,
):
    ch = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = ch < C
    momentum = join_f64(mom_hi, mom_lo, IS_F64)
    keep = join_f64(keep_hi, keep_lo, IS_F64)  # 1 - momentum, rounded once on the host
    unbias = join_f64(unbias_hi, unbias_lo, IS_F64)  # count / (count - 1)
    mean = load_acc(mean_ptr, ch, cmask, IS_F64)
    var = load_acc(var_ptr, ch, cmask, IS_F64)
    rm_offs = ch.to(tl.int64) * rm_stride
    rv_offs = ch.to(tl.int64) * rv_stride
    rm = keep * load_acc(rm_ptr, rm_offs, cmask, IS_F64) + momentum * mean
    rv = keep * load_acc(rv_ptr, rv_offs, cmask, IS_F64) + momentum * var * unbias
    store_rounded(rm_ptr, rm_offs, rm, cmask)
    store_rounded(rv_ptr, rv_offs, rv, cmask)


# --------------------------------------------------------------------------------------
# Launchers and ops
# --------------------------------------------------------------------------------------


def _launch_stats(input: Tensor) -> tuple[Tensor, Tensor]:
    check_stats_args(input)
    x, geo = prepare_input(input)
    mean = torch.empty((geo.c,), dtype=geo.acc, device=x.device)
    var = torch.empty((geo.c,), dtype=geo.acc, device=x.device)
    if geo.c == 0:
        return mean, var
    cfg = reduce_config(geo, x.device)
    # (count, shifted mean, M2) of every (split, channel): three tensors, not views of one, as
    # every kernel output is its own tensor.
    partials = tuple(torch.empty((cfg.splits, geo.c), dtype=geo.acc, device=x.device) for _ in range(3))
    block_s, block_c = merge_blocks(geo.c, cfg.splits)
    block_j = max(1, TUNING.merge_tile // block_c)  # the rare path's tile: the merge tile's size
    with device_guard(x.device):
        if geo.nhwc:
            wrap_triton(_stats_partial_nhwc_kernel)[cfg.grid](
                x, *partials, geo.rows, geo.c, cfg.n_tiles, cfg.tiles_per_program,
                IS_F64=geo.is_f64, BLOCK_M=cfg.block_a, BLOCK_C=cfg.block_b, num_warps=cfg.num_warps,
            )
        else:
            wrap_triton(_stats_partial_nchw_kernel)[cfg.grid](
                x, *partials, geo.n, geo.c, geo.hw, cfg.n_tiles, cfg.tiles_b, cfg.tiles_per_program,
                IS_F64=geo.is_f64, BLOCK_N=cfg.block_a, BLOCK_HW=cfg.block_b, num_warps=cfg.num_warps,
            )
        wrap_triton(_stats_merge_kernel)[(triton.cdiv(geo.c, block_c),)](
            x, *partials, mean, var, geo.c, cfg.splits, geo.shift_stride, geo.n * geo.hw,
            *split_f64(1.0 / (geo.n * geo.hw), 3), geo.n, geo.hw, geo.c if geo.nhwc else 1,
            IS_F64=geo.is_f64, BLOCK_S=block_s, BLOCK_C=block_c, BLOCK_J=block_j, num_warps=4,
        )
    return mean, var


@triton_op(
    "fused_residual::triton_bn_stats",
    mutates_args=(),
    schema="(Tensor input) -> (Tensor mean, Tensor var)",
)
def triton_bn_stats(input: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of `input` over (N, H, W), in the acc dtype."""
    return _launch_stats(input)


def _launch_update_running_stats(
    mean: Tensor, var: Tensor, count: int, running_mean: Tensor, running_var: Tensor, momentum: float
) -> None:
    check_update_running_stats_args(mean, var, count, running_mean, running_var)
    c = mean.shape[0]
    if c == 0:
        return
    is_f64 = acc_dtype(mean.dtype) == torch.float64
    block_c = min(1024, triton.next_power_of_2(c))
    with device_guard(mean.device):
        wrap_triton(_update_running_stats_kernel)[(triton.cdiv(c, block_c),)](
            mean.contiguous(), var.contiguous(), running_mean, running_var, c,
            running_mean.stride(0), running_var.stride(0),
            *split_f64(momentum), *split_f64(1 - momentum), *split_f64(count / (count - 1)),
            IS_F64=is_f64, BLOCK_C=block_c, num_warps=4,
        )


@triton_op(
    "fused_residual::triton_bn_update_running_stats",
    mutates_args=("running_mean", "running_var"),
    schema="(Tensor mean, Tensor var, int count, Tensor(a!) running_mean, Tensor(b!) running_var, "
    "float momentum) -> ()",
)
def triton_bn_update_running_stats(
    mean: Tensor, var: Tensor, count: int, running_mean: Tensor, running_var: Tensor, momentum: float
) -> None:
    """In place: running = (1 - momentum) * running + momentum * batch (var unbiased)."""
    _launch_update_running_stats(mean, var, count, running_mean, running_var, momentum)
