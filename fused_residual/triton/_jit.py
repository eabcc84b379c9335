"""The `@triton.jit` helpers every Triton kernel of the backend uses: host floats passed as
fp32 pieces (`join_f64`), IEEE division and 1/sqrt, the reduction tiles of the NCHW and NHWC
layouts, loads and stores in the accumulation dtype, per-channel affine coefficients, and the
channel of an element in flat mode (see `_common.py` for the geometry).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def join_f64(hi, lo, IS_F64: tl.constexpr):
    """A host float passed as an fp32 (hi, lo) pair, in the accumulation dtype."""
    if IS_F64:
        return tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)
    else:
        return tl.cast(hi, tl.float32)


@triton.jit
def join3_f64(hi, mid, lo, IS_F64: tl.constexpr):
    """A host float passed as three fp32 parts (`split_f64(v, 3)`), exact in float64."""
    if IS_F64:
        return (tl.cast(hi, tl.float64) + tl.cast(mid, tl.float64)) + tl.cast(lo, tl.float64)
    else:
        return tl.cast(hi, tl.float32)


@triton.jit
def div_rn(a, b):
    """a / b correctly rounded (IEEE round to nearest even) in the dtype of the tensor `a`.

    Compiled for a GPU, Triton's fp32 `/` is PTX `div.full.f32`, an approximation within
    2 ulp; PyTorch divides with IEEE division, so every division of the backend is this one
    (`tl.math.div_rn`: PTX `div.rn.f32`, fp32 only). fp64 `/` is `div.rn.f64` already.
    tests/test_gpu_static.py fails on any approximate division in the compiled kernels."""
    if a.dtype == tl.float64:
        return a / b
    else:
        return tl.math.div_rn(a, tl.cast(b, tl.float32))  # b may be an integer count


@triton.jit
def rstd(var, eps):
    """invstd = 1 / sqrt(var + eps), as PyTorch's BatchNorm computes it: a correctly rounded
    square root, then a correctly rounded division (never an approximate rsqrt).

    Compiled, fp32 `tl.sqrt` is `sqrt.approx.ftz.f32`, whose error |x_hat| and, in the
    backward, invstd^2 amplify; `tl.math.sqrt_rn` is `sqrt.rn.f32` (fp32 only). fp64
    `tl.sqrt` is `sqrt.rn.f64`. Triton's interpreter computes both exactly in numpy."""
    v = var + eps
    if v.dtype == tl.float64:
        return 1.0 / tl.sqrt(v)
    else:
        return tl.math.div_rn(1.0, tl.math.sqrt_rn(v))


@triton.jit
def nchw_tile(t, tiles_hw, rn, rhw, N, C, HW, chan, BLOCK_N: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Offsets and validity of reduction tile `t` of one NCHW channel (element offset `chan`
    of image 0): tiles are BLOCK_N images x BLOCK_HW positions, `tiles_hw` per row of H*W."""
    tn = t // tiles_hw
    n = tl.cast(tn, tl.int64) * BLOCK_N + rn
    hw = (t - tn * tiles_hw) * BLOCK_HW + rhw
    return n * C * HW + chan + hw, (n < N) & (hw < HW)


@triton.jit
def nhwc_tile(t, rm, ch, cmask, M, C, BLOCK_M: tl.constexpr):
    """Offsets and validity of reduction tile `t` of the (N*HW, C) matrix: BLOCK_M rows of
    the channels `ch`."""
    m = tl.cast(t, tl.int64) * BLOCK_M + rm
    return m * C + ch[None, :], (m < M) & cmask[None, :]


@triton.jit
def partials_chunk(s0, rs, S, C, ch, cmask):
    """Offsets and validity of the chunk of (S, C) partials at rows s0 + rs, channels ch."""
    s = s0 + rs
    return s.to(tl.int64) * C + ch[None, :], (s < S) & cmask[None, :]


@triton.jit
def to_acc(v, IS_F64: tl.constexpr):
    """`v` in the accumulation dtype: fp32, or fp64 for fp64 input."""
    if IS_F64:
        return v.to(tl.float64)
    else:
        return v.to(tl.float32)


@triton.jit
def load_acc(ptr, offs, mask, IS_F64: tl.constexpr):
    """A masked load converted to the accumulation dtype (fp32, or fp64 for fp64 input)."""
    if IS_F64:
        return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float64)
    else:
        return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def store_rounded(ptr, offs, v, mask):
    """Store `v` in the element type of `ptr`; float64 goes to a 16-bit type through float32,
    as torch converts it."""
    if ptr.dtype.element_ty != tl.float64:
        v = v.to(tl.float32)
    tl.store(ptr + offs, v.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def channel_affine(mean_ptr, var_ptr, w_ptr, b_ptr, ch, cmask, eps,
                   HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, IS_F64: tl.constexpr):
    """Per-channel (mean, scale = invstd * w, bias) of `y = (x - mean) * scale + bias`."""
    mean = load_acc(mean_ptr, ch, cmask, IS_F64)
    scale = rstd(load_acc(var_ptr, ch, cmask, IS_F64), eps)
    if HAS_WEIGHT:
        scale = scale * load_acc(w_ptr, ch, cmask, IS_F64)
    if HAS_BIAS:
        bias = load_acc(b_ptr, ch, cmask, IS_F64)
    else:
        bias = tl.zeros_like(mean)
    return mean, scale, bias


@triton.jit
def _div_small(v, d, d_inv, FAST_DIV: tl.constexpr):
    """v // d for int32 0 <= v, 1 <= d. FAST_DIV (the host checked v < 2^21): with
    r = fl(1/d), fl((v + 0.5) * r) is within (v + 0.5) / d * 2^-23 < 0.5 / d of (v + 0.5) / d,
    whose distance to an integer is at least 0.5 / d, so truncation gives the exact
    quotient with 4 float instructions instead of a ~20-instruction integer division."""
    if FAST_DIV:
        return ((v.to(tl.float32) + 0.5) * d_inv).to(tl.int32)
    else:
        return v // d


@triton.jit
def flat_channel(base, local, C, HW, c_inv, hw_inv, NHWC: tl.constexpr, FAST_DIV: tl.constexpr):
    """Channel of the elements `base + local` (int64 scalar + int32 offsets in [0, BLOCK))
    in the working layout's memory order; vector arithmetic stays in int32 / fp32."""
    if NHWC:  # e % C
        t = (base % C).to(tl.int32) + local
    else:  # (e // HW) % C
        row0 = base // HW
        rem0 = (base - row0 * HW).to(tl.int32)
        t = (row0 % C).to(tl.int32) + _div_small(rem0 + local, HW, hw_inv, FAST_DIV)
    return t - C * _div_small(t, C, c_inv, FAST_DIV)
