"""Shared host-side pieces of the Triton backend: the working-layout geometry, the launch
heuristics (a small tuned table) and each kernel's launch plan. The `@triton.jit` helpers
every kernel uses are in `_jit.py`; registration, launching and the device guard in
`_launch.py`.

Geometry. Kernels never see strides: an input is first brought into its working layout
(`reference.working_layout`, a no-op on the hot path) and then addressed as a dense array in
memory order, so the element index `e` used for the packed mask is also the memory offset.

* NCHW: `N * C` rows of `HW` contiguous values; channel of row `r` is `r % C`. A channel's
  values are `N` rows of `HW` at a stride of `C * HW`.
* channels_last (NHWC): `N * HW` rows of `C` contiguous values; the channel is the column.
  An NCHW input with `H * W == 1` has exactly this memory order and is treated as NHWC.

Element-wise kernels (bn_apply, bn_backward_apply) tile that row matrix `[ROWS, COLS]` in
blocks `[BLOCK_R, BLOCK_J, 8]` whose last axis holds the 8 bits of one mask byte, when
`COLS % 8 == 0` ("rows" mode: every row starts on a mask byte). Otherwise ("flat" mode) the
flat memory order is tiled in `[BLOCK_J, 8]` blocks, the channel of each element is
recomputed (a division by a float reciprocal, exact in the range used: `_div_small`) and its
per-channel coefficients are gathered from a small table a prologue kernel writes.
Reduction kernels (bn_stats, bn_backward_reduce) give each program one channel (NCHW) or
one block of channels (NHWC) and a fixed range of tiles; per-program partials are merged
by a second small kernel in a fixed order, so the results are bitwise reproducible for a
given shape and device. Every launcher runs its kernels under `_launch.device_guard` (the
tensors' device made current, as the C++ ops' CUDAGuard does).
"""

from __future__ import annotations

import dataclasses
import functools
import struct

import torch
import triton
from torch import Tensor

from ..reference import acc_dtype, working_layout

# The launch plan of each kernel, by name: "elementwise" (a program per tile, occupancy from
# `Tuning.elementwise_programs_per_sm`), "reduce" (a grid sized for `Tuning.programs_per_sm`
# programs per SM) or "per_channel" (a few programs over C). tests/triton_aot.py holds
# every compiled kernel to the registers its plan allows (`planned_programs_per_sm`).
KERNEL_PLANS: dict[str, str] = {}


def launch_plan(plan: str):
    """Records the launch plan ("elementwise", "reduce" or "per_channel") of a @triton.jit
    kernel (applied on top of @triton.jit; the kernel is returned unchanged)."""
    assert plan in ("elementwise", "reduce", "per_channel"), plan

    def record(kernel):
        KERNEL_PLANS[kernel.fn.__name__] = plan
        return kernel

    return record


def planned_programs_per_sm(kernel_name: str, dual: bool = False) -> int:
    """Programs of kernel `kernel_name` (its DUAL variant: `dual`) that its launch plan expects
    resident on one SM at once: the register budget of an sm_90 compile is
    65536 / (this * 32 * num_warps)."""
    plan = KERNEL_PLANS[kernel_name]
    if plan == "elementwise":
        return TUNING.dual_elementwise_programs_per_sm if dual else TUNING.elementwise_programs_per_sm
    if plan == "reduce":
        return TUNING.programs_per_sm
    return 1  # per-channel kernels: a few programs, one per SM


# --------------------------------------------------------------------------------------
# Tuning table
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tuning:
    """Launch heuristics. Every field is a power of two except the program counts.

    Occupancy plan (sm_90: 65536 registers and 2048 threads per SM). Element-wise programs
    move `elementwise_tile` elements (half for float64), 8 per thread at 8 warps (4 for
    float64): one or two 128-bit accesses per operand. The grid is one program per tile,
    and `elementwise_programs_per_sm` of them are meant to be resident at once: <= 64
    registers per thread, 16 KiB of bf16 per operand in flight per SM; the two-BatchNorm
    (DUAL) variants plan `dual_elementwise_programs_per_sm` (<= 80 registers: ten per-channel
    coefficients of 8 channels, each invstd an IEEE sqrt and division, whose slow paths need
    registers; 16-bit channels_last took 78-80 under Triton 3.6-3.8, where the approximate
    sqrt and division fit 64), as the CUDA backend's fp32 dual kernel does. Reduction programs
    keep `reduce_tile / 2` lanes (a quarter for float64) of accumulators, 4 per thread at 8
    warps (Welford's 3 or the backward's 4 accumulators per value); their grid is sized for
    `programs_per_sm` resident programs per SM (<= 64 registers). Float64 kernels and
    unaligned channels_last reductions take half the lanes per program (`_lane_divisor`).
    tests/test_gpu_static.py compiles every kernel variant of the ResNet-50 shapes for
    sm_90 and fails on a spill or on registers above these budgets. Block widths along a
    row come from `_pick_block`.
    """

    elementwise_tile: int = 2048
    elementwise_max_cols: int = 1024
    elementwise_programs_per_sm: int = 4
    dual_elementwise_programs_per_sm: int = 3
    reduce_tile: int = 2048
    reduce_max_hw: int = 1024  # NCHW reduction: widest contiguous segment of a row
    reduce_max_c: int = 64  # NHWC reduction: channels per program
    merge_block_c: int = 128  # channels per program of the merge kernels
    merge_tile: int = 512  # partials per loop step of the merge kernels (4 per thread)
    programs_per_sm: int = 4  # reduction programs aimed for, per SM
    min_tiles_per_program: int = 2
    max_splits: int = 1024
    cpu_sm_count: int = 4  # "SMs" assumed under the interpreter


TUNING = Tuning()


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """SMs of `device` (cached: no device query per launch); TUNING.cpu_sm_count otherwise."""
    if device.type != "cuda":
        return TUNING.cpu_sm_count
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _pick_block(extent: int, max_block: int, min_block: int) -> int:
    """Block width along a contiguous row of `extent` values: the whole row (padded to a
    power of two) when that fits in `max_block`, so a tile reads whole rows; otherwise the
    largest power of two in [min_block, max_block] leaving at most 1/8 of the row's blocks
    as padding (e.g. 3136 = 56*56 -> 512, 12544 -> 1024)."""
    full = triton.next_power_of_2(extent)
    if full <= max_block:
        return full
    block = max_block
    while block > min_block:
        if triton.cdiv(extent, block) * block * 7 <= extent * 8:
            return block
        block //= 2
    return min_block


def _values_per_thread(geo: Geometry, reduction: bool = False) -> int:
    """Values of one operand a thread holds per step: element-wise kernels 8 (one or two
    128-bit accesses), reductions 4 (each keeps 3 or 4 accumulators per value); half of
    that in float64, so that a float64 kernel needs about the registers of a float32 one."""
    values = 4 if reduction else 8
    return values // 2 if geo.is_f64 else values


def _lane_divisor(geo: Geometry, reduction: bool = False) -> int:
    """2 where a program gets half the lanes (4 warps instead of 8, same values per thread),
    so that its registers fit the per-thread budget of its planned occupancy (128 instead of
    64 at 4 programs per SM): float64 kernels (two registers per value; Triton 3.6 compiles
    the dual apply to ~100) and channels_last reductions with C % 8 != 0 (no vector loads:
    an address per value; 73 registers under Triton 3.6). tests/test_gpu_static.py checks."""
    return 2 if geo.is_f64 or (reduction and geo.nhwc and geo.c % 8 != 0) else 1


def _warps(lanes: int, per_thread: int) -> int:
    return max(1, min(8, lanes // (32 * per_thread)))


# --------------------------------------------------------------------------------------
# Checks and geometry
# --------------------------------------------------------------------------------------


def per_channel(t: Tensor | None) -> Tensor | None:
    """A 1-D per-channel tensor the kernels can index densely (no copy when contiguous)."""
    return None if t is None else t.contiguous()


@dataclasses.dataclass(frozen=True)
class Geometry:
    n: int
    c: int
    hw: int
    layout: torch.memory_format  # the working layout (outputs are allocated in it)
    nhwc: bool  # memory is N*HW rows of C (channels_last, or NCHW with HW == 1)
    numel: int
    acc: torch.dtype

    @property
    def rows(self) -> int:
        return self.n * self.hw if self.nhwc else self.n * self.c

    @property
    def cols(self) -> int:
        return self.c if self.nhwc else self.hw

    @property
    def is_f64(self) -> bool:
        return self.acc == torch.float64

    @property
    def shift_stride(self) -> int:
        """Memory offset of x[0, c, 0, 0] is c * shift_stride."""
        return 1 if self.nhwc else self.hw


def prepare_input(input: Tensor) -> tuple[Tensor, Geometry]:
    """`input` (already checked) in its working layout (no copy when it already is), and its
    description."""
    layout = working_layout(input)
    x = input.contiguous(memory_format=layout)
    n, c, h, w = x.shape
    geo = Geometry(n=n, c=c, hw=h * w, layout=layout, nhwc=layout == torch.channels_last or h * w == 1,
                   numel=x.numel(), acc=acc_dtype(x.dtype))
    return x, geo


def like_input(t: Tensor, geo: Geometry) -> Tensor:
    """`residual` / `grad_out` / `input2` (already checked) in the input's working layout
    (copied only when it is not)."""
    return t.contiguous(memory_format=geo.layout)


def empty_like_working(x: Tensor, geo: Geometry) -> Tensor:
    return torch.empty_like(x, memory_format=geo.layout)


def split_f64(value: float, parts: int = 2) -> tuple[float, ...]:
    """`value` as `parts` fp32 numbers (Triton passes Python floats as fp32) whose float64
    sum is `value` to ~24 * parts bits: hi = float32(value), then float32 of each remainder.
    Two parts (`join_f64`) restore ~48 bits, three (`join3_f64`) all 53 of a double."""
    out = []
    rest = value
    for _ in range(parts):
        part = struct.unpack("f", struct.pack("f", rest))[0]
        out.append(part)
        rest -= part
    return tuple(out)


# --------------------------------------------------------------------------------------
# Launch configurations
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ElementwiseConfig:
    rows_mode: bool
    block_r: int  # rows per block (rows mode); 1 in flat mode
    block_j: int  # mask bytes per row segment (rows mode) or per block (flat mode)
    col_blocks: int  # blocks along a row (rows mode)
    grid: tuple[int]
    num_warps: int
    fast_div: bool = False  # flat mode: see `_div_small`


# Flat mode divides int32 values below HW + BLOCK and C + BLOCK; up to this bound a float
# reciprocal gives exact quotients (`_div_small`).
FAST_DIV_LIMIT = 2**21


def elementwise_config(geo: Geometry) -> ElementwiseConfig:
    t = TUNING
    per_thread = _values_per_thread(geo)
    tile = max(8, t.elementwise_tile * per_thread // 8 // _lane_divisor(geo))
    if geo.cols % 8 == 0:
        block_cols = _pick_block(geo.cols, max(8, min(tile, t.elementwise_max_cols)), 8)
        block_r = max(1, min(tile // block_cols, triton.next_power_of_2(geo.rows)))
        col_blocks = triton.cdiv(geo.cols, block_cols)
        grid = (triton.cdiv(geo.rows, block_r) * col_blocks,)
        return ElementwiseConfig(True, block_r, block_cols // 8, col_blocks, grid,
                                 _warps(block_r * block_cols, per_thread))
    block = max(8, min(tile, triton.next_power_of_2(geo.numel)))
    fast_div = max(geo.c, geo.hw) + block < FAST_DIV_LIMIT
    return ElementwiseConfig(False, 1, block // 8, 1, (triton.cdiv(geo.numel, block),),
                             _warps(block, per_thread), fast_div)


@dataclasses.dataclass(frozen=True)
class ReduceConfig:
    block_a: int  # NCHW: rows (n) per tile; NHWC: rows (n*hw) per tile
    block_b: int  # NCHW: hw per tile; NHWC: channels per program
    tiles_b: int  # NCHW: tiles along HW (a tile index t is (t // tiles_b, t % tiles_b))
    n_tiles: int  # tiles per channel (group)
    tiles_per_program: int
    splits: int  # programs per channel (group): the S of the (S, C) partials
    grid: tuple[int, int]
    num_warps: int


def reduce_config(geo: Geometry, device: torch.device) -> ReduceConfig:
    t = TUNING
    per_thread = _values_per_thread(geo, reduction=True)
    tile = max(1, t.reduce_tile * per_thread // 8 // _lane_divisor(geo, reduction=True))
    if geo.nhwc:
        block_b = _pick_block(geo.c, t.reduce_max_c, min(16, t.reduce_max_c))
        block_a = max(1, min(tile // block_b, triton.next_power_of_2(geo.rows)))
        tiles_b = 1
        n_tiles = triton.cdiv(geo.rows, block_a)
        groups = triton.cdiv(geo.c, block_b)
    else:
        block_b = _pick_block(geo.hw, min(tile, t.reduce_max_hw), min(8, t.reduce_max_hw))
        block_a = max(1, min(tile // block_b, triton.next_power_of_2(geo.n)))
        tiles_b = triton.cdiv(geo.hw, block_b)
        n_tiles = triton.cdiv(geo.n, block_a) * tiles_b
        groups = geo.c
    want = triton.cdiv(sm_count(device) * t.programs_per_sm, groups)
    want = max(1, min(want, t.max_splits, triton.cdiv(n_tiles, t.min_tiles_per_program)))
    tiles_per_program = triton.cdiv(n_tiles, want)
    splits = triton.cdiv(n_tiles, tiles_per_program)
    return ReduceConfig(block_a, block_b, tiles_b, n_tiles, tiles_per_program, splits, (groups, splits),
                        _warps(block_a * block_b, per_thread))


def merge_blocks(c: int, splits: int) -> tuple[int, int]:
    """(BLOCK_S, BLOCK_C) of the merge kernels: chunks of BLOCK_S partials of BLOCK_C channels."""
    block_c = min(TUNING.merge_block_c, triton.next_power_of_2(c))
    block_s = min(triton.next_power_of_2(splits), max(1, TUNING.merge_tile // block_c))
    return block_s, block_c
