"""Op-by-op tests of the Triton backend (fused_residual/triton) against fused_residual.reference.

Without a GPU the kernels run in Triton's interpreter on CPU tensors: TRITON_INTERPRET=1 is
set below before anything imports Triton (Triton reads it when a kernel is decorated). With
a GPU they run compiled on CUDA. Every op is compared with the reference evaluated in
float64 on the same (dtype-rounded) inputs, with tolerances derived from the dtypes' eps:

* a value rounded once to the output dtype may differ from the rounded float64 value by
  one ulp: `eps(dtype) * |ref|` (eps is the spacing at 1.0, so this is >= 1 ulp of ref);
* fp32 (or fp64) accumulation adds a few roundings per element, each <= eps(acc) times
  the magnitude of the terms involved: `K * eps(acc) * scale`, with `scale` the sum of the
  absolute values of the terms (computed in float64) and K = 16 for element-wise results
  (6 to 8 roundings, approximate sqrt/division on GPU) and K = 64 for sums over a channel
  (tests have at most ~10^3 values per channel, summed per lane and then as a tree);
* float16 values below 2^-14 are subnormal, with a fixed spacing of 2^-24.

Masks are compared bit for bit with the op's own output's signs (numerics contract (b),
docs/op_layer.md), and with the float64 reference's wherever |y| is larger than the
accumulation tolerance (where it is not, the sign of the fp32 value is legitimately
undecided: the ReLU kink); padding bits must be 0. `tiny_tiles` reruns the ops with tiny
blocks so that the multi-program paths (several splits per channel, several channel /
column blocks, partial edge tiles) are exercised on small shapes.
"""

from __future__ import annotations

import os

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before fused_residual.triton imports Triton

import dataclasses  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402

import pytest  # noqa: E402

import fused_residual.triton as frt  # noqa: E402
from fused_residual.reference import (  # noqa: E402
    bn_apply_reference,
    bn_backward_apply_reference,
    bn_backward_reduce_reference,
    bn_dual_apply_reference,
    bn_stats_reference,
    bn_update_running_stats_reference,
    pack_mask,
    unpack_mask,
    working_layout,
)

pytestmark = pytest.mark.skipif(
    not frt.available(DEVICE),
    reason=f"Triton backend not runnable on {DEVICE} (no Triton, or fused_residual.triton was imported "
    "before TRITON_INTERPRET=1 was set)",
)

REPO = pathlib.Path(__file__).resolve().parents[1]
EPS = 1e-5
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(2, 3, 5, 7), (1, 1, 1, 2), (3, 8, 1, 1), (2, 16, 7, 7), (4, 5, 3, 3), (2, 3, 4, 4)]
LAYOUTS = ["nchw", "nhwc", "strided"]


def ops():
    return torch.ops.fused_residual


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def acc_eps(dtype: torch.dtype) -> float:
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


def tiny(dtype: torch.dtype) -> float:
    return 2.0**-24 if dtype == torch.float16 else 0.0


def to_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "nchw":
        return t.contiguous()
    if layout == "nhwc":
        return t.contiguous(memory_format=torch.channels_last)
    # every other W of a twice-as-wide tensor: neither contiguous nor channels_last
    wide = torch.zeros(*t.shape[:3], 2 * t.shape[3], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


def other_layout(layout: str) -> str:
    return "nchw" if layout == "nhwc" else "nhwc"


def make(shape, dtype, layout="nchw", offset=0.0, std=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(shape, generator=g, dtype=torch.float64) * std + offset).to(dtype)
    return to_layout(t.to(DEVICE), layout)


def per_channel(c, dtype=torch.float32, seed=0, positive=False, offset=0.0):
    g = torch.Generator().manual_seed(seed + 1000)
    t = torch.randn(c, generator=g, dtype=torch.float64)
    if positive:
        t = t.abs() + 0.25
    return (t + offset).to(dtype).to(DEVICE)


def random_mask(x: torch.Tensor, seed=0, padding_ones=False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 2000)
    bits = (torch.rand(x.shape, generator=g) > 0.4).to(DEVICE)
    mask = pack_mask(bits, working_layout(x))
    if padding_ones and x.numel() % 8:
        mask[-1] |= (0xFF << (x.numel() % 8)) & 0xFF
    return mask


def d(t):
    return None if t is None else t.double()


def assert_within(actual, expected, tol, what):
    """|actual - expected| <= tol elementwise (NaN must match NaN); on failure prints the
    positions that exceed their tolerance most."""
    actual = actual.double().cpu()
    expected = expected.double().cpu()
    tol = torch.as_tensor(tol, dtype=torch.float64).cpu().expand_as(expected)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    nan_ok = torch.isnan(actual) & torch.isnan(expected)
    err = (actual - expected).abs()
    bad = ~(err <= tol) & ~nan_ok
    if bad.any():
        excess = torch.where(bad, torch.nan_to_num(err - tol, nan=float("inf")), -1.0)
        worst = excess.flatten().argsort(descending=True)[: min(10, int(bad.sum()))]
        idx = torch.stack(torch.unravel_index(worst, excess.shape), dim=1)
        rows = [f"  at {tuple(i.tolist())}: got {actual[tuple(i)].item()!r}, expected "
                f"{expected[tuple(i)].item()!r}, tol {tol[tuple(i)].item():.3g}" for i in idx]
        pytest.fail(f"{what}: {int(bad.sum())} of {bad.numel()} values out of tolerance\n" + "\n".join(rows))


def assert_mask(mask, y64, ambiguous, x, what="mask"):
    """Packed mask bits == (y > 0) wherever not ambiguous; padding bits 0; memory order of
    x's working layout."""
    layout = working_layout(x)
    assert mask.dtype == torch.uint8 and mask.shape == ((x.numel() + 7) // 8,), f"{what}: {mask.shape}"
    got = unpack_mask(mask.cpu(), x.shape, layout)
    want = (y64 > 0).cpu()
    bad = (got != want) & ~ambiguous.cpu()
    if bad.any():
        idx = bad.nonzero()[:10]
        rows = [f"  at {tuple(i.tolist())}: bit {int(got[tuple(i)])}, y = {y64[tuple(i)].item()!r}"
                for i in idx]
        pytest.fail(f"{what}: {int(bad.sum())} bits differ\n" + "\n".join(rows))
    if x.numel() % 8:
        assert int(mask[-1]) >> (x.numel() % 8) == 0, f"{what}: padding bits not zero: {int(mask[-1]):#x}"


def assert_mask_is_own_output(mask, out, x, what):
    """Numerics contract (b): the mask bit is set exactly where the op's own output is > 0."""
    want = pack_mask((out > 0).cpu(), working_layout(x))
    assert torch.equal(mask.cpu(), want), f"{what}: mask differs from its own output's signs"


def check_layout(out, x, what):
    layout = working_layout(x)
    assert out.shape == x.shape, what
    assert out.is_contiguous(memory_format=layout), f"{what}: not in the working layout {layout}"


@pytest.fixture
def tiny_tiles(monkeypatch):
    """Blocks of a few elements and many programs per channel."""
    from fused_residual.triton import _common

    monkeypatch.setattr(_common, "TUNING", dataclasses.replace(
        _common.TUNING, elementwise_tile=16, elementwise_max_cols=8, reduce_tile=8,
        reduce_max_hw=8, reduce_max_c=4, merge_block_c=4, merge_tile=8, programs_per_sm=64,
        min_tiles_per_program=1, cpu_sm_count=4))


# --------------------------------------------------------------------------------------
# Per-op checks (shared by the parametrized tests)
# --------------------------------------------------------------------------------------


def check_stats(x, what="bn_stats"):
    mean, var = ops().triton_bn_stats(x)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    assert mean.dtype == acc and var.dtype == acc and mean.shape == (x.shape[1],)
    m64, v64 = bn_stats_reference(x.double())
    spread = (x.double() - m64.view(1, -1, 1, 1)).abs().amax(dim=(0, 2, 3))
    e = acc_eps(x.dtype)
    assert_within(mean, m64, 8 * e * m64.abs() + 64 * e * spread, f"{what} mean")
    assert_within(var, v64, 64 * e * v64, f"{what} var")
    return mean, var


def apply_expected(x, r, mean, var, w, b):
    """float64 pre-ReLU y and the magnitude of its terms."""
    invstd = torch.rsqrt(var.double() + EPS)
    scale = invstd * (w.double() if w is not None else 1.0)
    xhat = (x.double() - mean.double().view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1)
    y = xhat + (b.double().view(1, -1, 1, 1) if b is not None else 0.0)
    mag = xhat.abs()  # x - mean is exact or rounded relative to itself: no |x| term
    if b is not None:
        mag = mag + b.double().abs().view(1, -1, 1, 1)
    if r is not None:
        y = y + r.double()
        mag = mag + r.double().abs()
    return y, mag


def check_apply(x, r, mean, var, w, b, save_mask, what="bn_apply"):
    out, mask = ops().triton_bn_apply(x, r, mean, var, w, b, EPS, save_mask)
    check_layout(out, x, what)
    assert out.dtype == x.dtype
    ref, _ = bn_apply_reference(d(x), d(r), d(mean), d(var), d(w), d(b), EPS, False)
    y64, mag = apply_expected(x, r, mean, var, w, b)
    e_acc = acc_eps(x.dtype)
    acc_tol = 16 * e_acc * mag
    assert_within(out, ref, torch.finfo(x.dtype).eps * ref.abs() + acc_tol + tiny(x.dtype), f"{what} out")
    if save_mask:
        assert_mask(mask, y64, y64.abs() <= acc_tol, x, f"{what} mask")
        assert_mask_is_own_output(mask, out, x, what)
    else:
        assert mask.dtype == torch.uint8 and mask.shape == (0,)
    return out, mask


def check_dual_apply(x, mean, var, w, b, x2, mean2, var2, w2, b2, save_mask, what="bn_dual_apply"):
    """bn_dual_apply against the float64 reference: per element, the terms of both
    BatchNorms bound the accumulation error, as for bn_apply."""
    eps2 = 1e-3
    out, mask = ops().triton_bn_dual_apply(x, mean, var, w, b, x2, mean2, var2, w2, b2, EPS, eps2, save_mask)
    check_layout(out, x, what)
    assert out.dtype == x.dtype
    ref, _ = bn_dual_apply_reference(d(x), d(mean), d(var), d(w), d(b), d(x2), d(mean2), d(var2), d(w2),
                                     d(b2), EPS, eps2, False)
    y1, mag1 = apply_expected(x, None, mean, var, w, b)
    invstd2 = torch.rsqrt(var2.double() + eps2) * (w2.double() if w2 is not None else 1.0)
    xhat2 = (x2.double() - mean2.double().view(1, -1, 1, 1)) * invstd2.view(1, -1, 1, 1)
    y2 = xhat2 + (b2.double().view(1, -1, 1, 1) if b2 is not None else 0.0)
    mag2 = xhat2.abs() + (b2.double().abs().view(1, -1, 1, 1) if b2 is not None else 0.0)
    acc_tol = 16 * acc_eps(x.dtype) * (mag1 + mag2)
    assert_within(out, ref, torch.finfo(x.dtype).eps * ref.abs() + acc_tol + tiny(x.dtype), f"{what} out")
    if save_mask:
        y64 = y1 + y2
        assert_mask(mask, y64, y64.abs() <= acc_tol, x, f"{what} mask")
        assert_mask_is_own_output(mask, out, x, what)
    else:
        assert mask.dtype == torch.uint8 and mask.shape == (0,)
    return out, mask


def check_backward_reduce(g, mask, x, mean, var, what="bn_backward_reduce"):
    sdy, sdyx, gw = ops().triton_bn_backward_reduce(g, mask, x, mean, var, EPS)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    assert all(t.dtype == acc and t.shape == (x.shape[1],) for t in (sdy, sdyx, gw))
    r_dy, r_dyx, r_gw = bn_backward_reduce_reference(d(g), mask, d(x), d(mean), d(var), EPS)
    bits = unpack_mask(mask.cpu(), x.shape, working_layout(x)).to(DEVICE)
    dy = torch.where(bits, d(g), 0.0)
    xmu = d(x) - d(mean).view(1, -1, 1, 1)
    e = 64 * acc_eps(x.dtype)
    invstd = torch.rsqrt(d(var) + EPS)
    abs_dyx = (dy * xmu).abs().sum(dim=(0, 2, 3))
    assert_within(sdy, r_dy, e * dy.abs().sum(dim=(0, 2, 3)), f"{what} sum_dy")
    assert_within(sdyx, r_dyx, e * abs_dyx, f"{what} sum_dy_xmu")
    assert_within(gw, r_gw, e * abs_dyx * invstd, f"{what} grad_weight")
    return sdy, sdyx, gw


def check_backward_apply(g, mask, x, mean, var, w, sdy, sdyx, count, need_gi, need_gr,
                         what="bn_backward_apply"):
    gi, gr = ops().triton_bn_backward_apply(g, mask, x, mean, var, w, sdy, sdyx, EPS, count, need_gi, need_gr)
    r_gi, r_gr = bn_backward_apply_reference(d(g), mask, d(x), d(mean), d(var), d(w), d(sdy), d(sdyx), EPS,
                                             count, need_gi, need_gr)
    for t in (gi, gr):
        assert t.dtype == x.dtype
    if need_gr:
        check_layout(gr, x, f"{what} grad_residual")
        assert_within(gr, r_gr, 0.0, f"{what} grad_residual")  # exact: dy or 0
    else:
        assert gr.shape == (0,)
    if need_gi:
        check_layout(gi, x, f"{what} grad_input")
        bits = unpack_mask(mask.cpu(), x.shape, working_layout(x)).to(DEVICE)
        dy = torch.where(bits, d(g), 0.0)
        invstd = torch.rsqrt(d(var) + EPS).view(1, -1, 1, 1)
        k = invstd * (d(w).view(1, -1, 1, 1) if w is not None else 1.0)
        mag = dy.abs()
        if sdy is not None:
            xmu = d(x) - d(mean).view(1, -1, 1, 1)
            mag = mag + (d(sdy) / count).abs().view(1, -1, 1, 1)
            mag = mag + (xmu * invstd * invstd * (d(sdyx) / count).view(1, -1, 1, 1)).abs()
        tol = torch.finfo(x.dtype).eps * r_gi.abs() + 16 * acc_eps(x.dtype) * k.abs() * mag + tiny(x.dtype)
        assert_within(gi, r_gi, tol, f"{what} grad_input")
    else:
        assert gi.shape == (0,)
    return gi, gr


# --------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------


def _cpp_schemas() -> dict[str, str]:
    src = (REPO / "csrc" / "ops.cpp").read_text()
    schemas = {}
    # m.def("schema" "continued", FUSED_RESIDUAL_TAGS): the string literals up to the tags
    for call in re.findall(r"m\.def\(\s*((?:\"[^\"]*\"\s*)+)[,)]", src):
        schema = "".join(re.findall(r"\"([^\"]*)\"", call))
        schemas[schema.split("(", 1)[0]] = schema
    return schemas


def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip()


def test_schemas_match_the_extension():
    cpp = _cpp_schemas()
    assert sorted(cpp) == sorted(n.removeprefix("triton_") for n in frt.OP_NAMES)
    for name, schema in cpp.items():
        op = getattr(torch.ops.fused_residual, f"triton_{name}").default
        assert _norm(str(op._schema)) == _norm(f"fused_residual::triton_{schema}")


def test_available():
    assert frt.TRITON_AVAILABLE
    assert frt.available(DEVICE)
    assert frt.available("cpu") == (os.environ.get("TRITON_INTERPRET") == "1")
    assert not frt.available("mps")


def _opcheck_cases():
    x = make((2, 3, 4, 5), torch.float32, "nhwc")
    m, v, w = per_channel(3), per_channel(3, positive=True), per_channel(3, seed=1)
    mask = random_mask(x)
    return {
        "triton_bn_stats": (x,),
        "triton_bn_update_running_stats": (m, v, 40, m.clone(), v.clone(), 0.1),
        "triton_bn_apply": (x, x.contiguous(), m, v, w, None, EPS, True),
        "triton_bn_backward_reduce": (x, mask, x, m, v, EPS),
        "triton_bn_backward_apply": (x, mask, x, m, v, w, m, v, EPS, 40, True, True),
        "triton_bn_dual_apply": (x, m, v, w, None, x.contiguous(), v, m.abs(), None, w, EPS, 1e-3, True),
        "triton_bn_train_forward": (x, x.contiguous(), m.clone(), v.clone(), w, None, 0.1, EPS, True),
        "triton_bn_backward": (x, mask, x, m, v, w, EPS, True, (True, True, True, False)),
    }


@pytest.mark.parametrize("name", frt.OP_NAMES)
def test_opcheck(name):
    """Schema, autograd registration and FakeTensor propagation (torch.library.opcheck); with
    a GPU also tracing through AOTDispatcher (torch.compile), which the interpreter cannot do."""
    utils = ["test_schema", "test_autograd_registration", "test_faketensor"]
    if DEVICE == "cuda":
        utils.append("test_aot_dispatch_dynamic")
    torch.library.opcheck(getattr(torch.ops.fused_residual, name), _opcheck_cases()[name], test_utils=utils)


# --------------------------------------------------------------------------------------
# bn_stats / bn_update_running_stats
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [0.0, 1e4])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bn_stats(dtype, layout, shape, offset):
    check_stats(make(shape, dtype, layout, offset=offset))


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_bn_stats_large_mean_offset_fp32(layout):
    """Mean 1e4, std 1 in fp32 (plain fp32 Welford or E[x^2] - E[x]^2 lose 3-8 digits)."""
    x = make((4, 3, 16, 16), torch.float32, layout, offset=1e4)
    mean, var = ops().triton_bn_stats(x)
    m64, v64 = bn_stats_reference(x.double())
    assert_within(var, v64, 1e-5 * v64, "var (offset 1e4)")
    assert_within(mean, m64, 1e-6 * m64.abs(), "mean (offset 1e4)")


@pytest.mark.parametrize("run_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("stat_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("momentum", [0.1, 0.37])
def test_bn_update_running_stats(stat_dtype, run_dtype, momentum):
    c, count = 7, 10
    mean = per_channel(c, stat_dtype, seed=1)
    var = per_channel(c, stat_dtype, seed=2, positive=True)
    # running stats with a stride of 2 (a view), updated in place
    rm_buf = per_channel(2 * c, run_dtype, seed=3)
    rv_buf = per_channel(2 * c, run_dtype, seed=4, positive=True)
    rm, rv = rm_buf[::2], rv_buf[::2]
    rm_ref, rv_ref = rm.double().clone(), rv.double().clone()
    bn_update_running_stats_reference(d(mean), d(var), count, rm_ref, rv_ref, momentum)
    rm_before, rv_before = rm.double().clone(), rv.double().clone()
    ops().triton_bn_update_running_stats(mean, var, count, rm, rv, momentum)
    assert rm.data_ptr() == rm_buf.data_ptr() and rv.dtype == run_dtype
    e = acc_eps(stat_dtype)
    for got, ref, before, new, name in ((rm, rm_ref, rm_before, d(mean), "running_mean"),
                                        (rv, rv_ref, rv_before, d(var) * count / (count - 1), "running_var")):
        mag = (1 - momentum) * before.abs() + momentum * new.abs()
        tol = torch.finfo(run_dtype).eps * ref.abs() + 16 * e * mag + tiny(run_dtype)
        assert_within(got, ref, tol, name)
    assert_within(rm_buf[1::2], per_channel(2 * c, run_dtype, seed=3)[1::2], 0.0, "untouched odd entries")


def test_bn_update_running_stats_rejects_count_1():
    t = per_channel(3)
    with pytest.raises(ValueError, match="count"):
        ops().triton_bn_update_running_stats(t, t, 1, t.clone(), t.clone(), 0.1)


# --------------------------------------------------------------------------------------
# bn_apply
# --------------------------------------------------------------------------------------

APPLY_VARIANTS = {
    "plain": dict(residual=None, weight=False, bias=False, save_mask=True, half_params=False),
    "affine+res": dict(residual="same", weight=True, bias=True, save_mask=True, half_params=False),
    "res-other-layout,no-mask": dict(residual="other", weight=True, bias=False, save_mask=False,
                                     half_params=False),
    "bias+res,params-in-input-dtype": dict(residual="same", weight=False, bias=True, save_mask=True,
                                           half_params=True),
}


def _apply_args(shape, dtype, layout, variant, offset=0.0, seed=0):
    v = APPLY_VARIANTS[variant]
    x = make(shape, dtype, layout, offset=offset, seed=seed)
    r = None
    if v["residual"] is not None:
        r_layout = layout if v["residual"] == "same" else other_layout(layout)
        r = make(shape, dtype, r_layout, seed=seed + 1)
    c = shape[1]
    pdt = dtype if v["half_params"] else torch.float32
    mean = per_channel(c, pdt, seed=seed + 2, offset=offset)
    var = per_channel(c, pdt, seed=seed + 3, positive=True)
    w = per_channel(c, pdt, seed=seed + 4) if v["weight"] else None
    b = per_channel(c, pdt, seed=seed + 5) if v["bias"] else None
    return x, r, mean, var, w, b, v["save_mask"]


@pytest.mark.parametrize("variant", list(APPLY_VARIANTS))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bn_apply(dtype, layout, shape, variant):
    check_apply(*_apply_args(shape, dtype, layout, variant))


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_bn_apply_mean_offset(dtype, layout):
    check_apply(*_apply_args((2, 16, 7, 7), dtype, layout, "affine+res", offset=1e4))


def _dual_args(shape, dtype, layout, variant, offset=0.0, seed=0):
    """bn_apply's arguments for `variant`, plus a second input (in the other layout when the
    variant's residual is "other") with its own statistics and affine (half the variants
    without weight2, the others without bias2)."""
    x, r, mean, var, w, b, save_mask = _apply_args(shape, dtype, layout, variant, offset, seed)
    if r is None:
        r = make(shape, dtype, layout, seed=seed + 1)
    c = shape[1]
    mean2 = per_channel(c, seed=seed + 6, offset=2.0)
    var2 = per_channel(c, seed=seed + 7, positive=True)
    w2 = per_channel(c, seed=seed + 8) if seed % 2 == 0 else None
    b2 = per_channel(c, seed=seed + 9) if seed % 2 == 1 else None
    return x, mean, var, w, b, r, mean2, var2, w2, b2, save_mask


DUAL_SHAPES = [(2, 3, 5, 7), (3, 8, 1, 1), (2, 16, 7, 7), (2, 3, 4, 4)]


@pytest.mark.parametrize("variant", list(APPLY_VARIANTS))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bn_dual_apply(dtype, layout, variant):
    for seed, shape in enumerate(DUAL_SHAPES):
        check_dual_apply(*_dual_args(shape, dtype, layout, variant, seed=seed))


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_bn_dual_apply_tiny_tiles_and_float64(tiny_tiles, layout):
    """Several programs per row / flat block, and the float64 path."""
    for dtype in (torch.float32, torch.float64):
        for seed, shape in enumerate([(2, 3, 5, 7), (3, 24, 2, 3), (2, 16, 4, 4)]):
            check_dual_apply(*_dual_args(shape, dtype, layout, "affine+res", offset=1e3, seed=seed))


def test_bn_dual_apply_rejects_bad_arguments():
    x = make((2, 3, 4, 5), torch.float32)
    m, v = per_channel(3), per_channel(3, positive=True)
    with pytest.raises(ValueError, match="input2 shape"):
        ops().triton_bn_dual_apply(x, m, v, None, None, x[:1], m, v, None, None, EPS, EPS, True)
    with pytest.raises(TypeError, match="input2 dtype"):
        ops().triton_bn_dual_apply(x, m, v, None, None, x.half(), m, v, None, None, EPS, EPS, True)
    with pytest.raises(ValueError, match="var2"):
        ops().triton_bn_dual_apply(x, m, v, None, None, x, m, per_channel(4), None, None, EPS, EPS, True)


def test_bn_apply_nan_propagates():
    x = make((2, 3, 4, 5), torch.float32)
    x[0, 1, 2, 3] = float("nan")
    out, mask = ops().triton_bn_apply(x, None, per_channel(3), per_channel(3, positive=True), None, None,
                                      EPS, True)
    assert torch.isnan(out[0, 1, 2, 3])
    assert not unpack_mask(mask, x.shape, working_layout(x))[0, 1, 2, 3]


def test_bn_apply_rejects_bad_arguments():
    x = make((2, 3, 4, 5), torch.float32)
    m, v = per_channel(3), per_channel(3, positive=True)
    with pytest.raises(ValueError):
        ops().triton_bn_apply(x[0], None, m, v, None, None, EPS, True)
    with pytest.raises(TypeError):
        ops().triton_bn_apply(x.int(), None, m, v, None, None, EPS, True)
    with pytest.raises(ValueError):
        ops().triton_bn_apply(x, None, per_channel(4), v, None, None, EPS, True)
    with pytest.raises(TypeError):
        ops().triton_bn_apply(x, x.half(), m, v, None, None, EPS, True)


# --------------------------------------------------------------------------------------
# bn_backward_reduce / bn_backward_apply
# --------------------------------------------------------------------------------------


def _backward_args(shape, dtype, layout, seed=0, offset=0.0, padding_ones=False):
    x = make(shape, dtype, layout, offset=offset, seed=seed)
    g = make(shape, dtype, other_layout(layout) if seed % 2 else layout, seed=seed + 1)
    mean, var = per_channel(shape[1], seed=seed + 2, offset=offset), per_channel(shape[1], seed=seed + 3,
                                                                                  positive=True)
    return g, random_mask(x, seed, padding_ones), x, mean, var


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bn_backward_reduce(dtype, layout, shape):
    check_backward_reduce(*_backward_args(shape, dtype, layout))


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_bn_backward_reduce_mean_offset_and_padding_bits(layout):
    # padding bits set to 1 must be ignored (the contract has them 0; kernels mask by numel)
    check_backward_reduce(*_backward_args((4, 5, 3, 3), torch.float32, layout, seed=1, offset=1e4,
                                          padding_ones=True))


BACKWARD_VARIANTS = {
    "train,w,both": dict(training=True, weight=True, need_gi=True, need_gr=True),
    "eval,no-w,both": dict(training=False, weight=False, need_gi=True, need_gr=True),
    "train,no-w,gi": dict(training=True, weight=False, need_gi=True, need_gr=False),
    "eval,w,gr": dict(training=False, weight=True, need_gi=False, need_gr=True),
    "none": dict(training=True, weight=True, need_gi=False, need_gr=False),
}


@pytest.mark.parametrize("variant", list(BACKWARD_VARIANTS))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bn_backward_apply(dtype, layout, shape, variant):
    v = BACKWARD_VARIANTS[variant]
    g, mask, x, mean, var = _backward_args(shape, dtype, layout, seed=len(variant))
    c = shape[1]
    w = per_channel(c, seed=7) if v["weight"] else None
    sdy = per_channel(c, seed=8) if v["training"] else None
    sdyx = per_channel(c, seed=9) if v["training"] else None
    count = shape[0] * shape[2] * shape[3]
    check_backward_apply(g, mask, x, mean, var, w, sdy, sdyx, count, v["need_gi"], v["need_gr"])


# --------------------------------------------------------------------------------------
# Chained forward + backward, float64, tiny tiles, determinism
# --------------------------------------------------------------------------------------


def _chain(x, r, w, b, what):
    """Training step of the op layer: stats -> apply -> backward reduce -> backward apply."""
    mean, var = check_stats(x, f"{what} bn_stats")
    _, mask = check_apply(x, r, mean, var, w, b, True, f"{what} bn_apply")
    g = make(x.shape, x.dtype, "nchw", seed=11)
    sdy, sdyx, _ = check_backward_reduce(g, mask, x, mean, var, f"{what} bn_backward_reduce")
    count = x.shape[0] * x.shape[2] * x.shape[3]
    check_backward_apply(g, mask, x, mean, var, w, sdy, sdyx, count, True, True, f"{what} bn_backward_apply")


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (2, 16, 7, 7), (2, 3, 4, 4), (3, 8, 1, 1)])
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "strided"])
def test_float64(layout, shape):
    c = shape[1]
    x = make(shape, torch.float64, layout, offset=3.0)
    r = make(shape, torch.float64, layout, seed=5)
    _chain(x, r, per_channel(c, torch.float64, seed=1), per_channel(c, torch.float64, seed=2), "fp64")


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (3, 24, 2, 3), (2, 16, 4, 4), (5, 9, 1, 1)])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_tiles(tiny_tiles, dtype, layout, shape):
    from fused_residual.triton import _common

    x = make(shape, dtype, layout, offset=2.0)
    x_, geo = _common.prepare_input(x)
    assert _common.reduce_config(geo, x_.device).splits > 1  # the multi-program paths run
    c = shape[1]
    _chain(x, make(shape, dtype, layout, seed=3), per_channel(c, seed=1), per_channel(c, seed=2), "tiny")


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_deterministic(tiny_tiles, layout):
    """Two runs give bitwise equal statistics and sums (fixed-order merges, no atomics)."""
    x = make((3, 12, 5, 3), torch.float32, layout, offset=1e4)
    g = make(x.shape, torch.float32, layout, seed=1)
    mask = random_mask(x)

    def run():
        mean, var = ops().triton_bn_stats(x)
        return (mean, var, *ops().triton_bn_backward_reduce(g, mask, x, mean, var, EPS))

    first, again = run(), run()
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)


def test_fast_division_is_exact():
    """The float-reciprocal quotient of `_jit._div_small` (fp32 arithmetic, as on the GPU)
    equals integer division for every v below the bound the host enforces."""
    import numpy as np

    from fused_residual.triton._common import FAST_DIV_LIMIT

    v = np.arange(FAST_DIV_LIMIT, dtype=np.int64)
    vf = v.astype(np.float32) + np.float32(0.5)
    rng = np.random.default_rng(0)
    divisors = [*range(1, 40), 49, 196, 3136, 12544, *rng.integers(40, FAST_DIV_LIMIT, 12).tolist()]
    for d in divisors:
        q = (vf * np.float32(1.0 / d)).astype(np.int64)
        bad = np.nonzero(q != v // d)[0]
        assert bad.size == 0, f"d={d}: first wrong v={bad[:5]}"


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_flat_mode_integer_division(monkeypatch, layout):
    """Flat mode with the exact integer-division fallback (huge C or H*W) and several blocks."""
    from fused_residual.triton import _common

    monkeypatch.setattr(_common, "FAST_DIV_LIMIT", 0)
    monkeypatch.setattr(_common, "TUNING", dataclasses.replace(_common.TUNING, elementwise_tile=64))
    x = make((2, 5, 3, 7), torch.float32, layout)
    _, geo = _common.prepare_input(x)
    cfg = _common.elementwise_config(geo)
    assert not cfg.rows_mode and not cfg.fast_div and cfg.grid[0] > 1
    _chain(x, make(x.shape, torch.float32, layout, seed=3), per_channel(5, seed=1), per_channel(5, seed=2),
           "int-div")


@pytest.mark.parametrize("shape", [(3, 5, 37, 41), (9, 40, 6, 7), (2, 24, 31, 16)])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_default_tuning_several_blocks(layout, shape):
    """Shapes large enough for several blocks and splits with the shipped tuning table."""
    x = make(shape, torch.bfloat16, layout, offset=1.0)
    c = shape[1]
    _chain(x, make(shape, torch.bfloat16, other_layout(layout), seed=3), per_channel(c, seed=1),
           per_channel(c, seed=2), "default tuning")
