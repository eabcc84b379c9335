"""Error bounds derived from the computation, for every result of the fused ops (the numerics
contract, docs/op_layer.md): what any correct implementation must meet, whatever its
summation order, thread count or vector width, and what a wrong one cannot.

Every bound is a first-order rounding-error analysis (Higham, *Accuracy and Stability of
Numerical Algorithms*, ch. 3-4) of the computation itself, evaluated in float64 on the same
(dtype-rounded) inputs the op got:

* a value rounded once has a relative error of at most the unit roundoff u = eps/2 of its
  dtype; a sum of k terms, in any order and any tree, is off by at most
  gamma(k) = k·u / (1 - k·u) times the sum of the terms' absolute values;
* an error in an input of a step moves its result by at most |d result / d input| times
  that error (first order: the bounds here are < 1e-2 relative, where the second order is
  below 1% of them);
* the statistics (`stats_error`) cover the two-pass algorithm and Welford's updating with
  Chan's pairwise merges in any tree: the mean within gamma(n + 64)·max|x| (Welford's update
  adds at most (n/2 + 5)·u·max|x|, each merge level 4u·max|x|, 16 levels at most), the
  variance within gamma(2n + 64)·sigma·rms(x) + (mean error)^2 (Chan, Golub & LeVeque 1983:
  n·kappa·u for updating and pairwise merges, kappa·v = sigma·rms(x); two-pass: gamma(n + 4)·v
  plus the squared mean error). E[x^2] - E[x]^2 is not covered: it loses the variance to
  cancellation, and the large-offset tests exist to fail it;
* the normalize step may be x·a + b' (a = w·invstd, b' = bias - mean·a, PyTorch's CPU
  kernels) or (x - mean)·invstd·w + bias: its terms include |x·a| and |mean·a| as well as
  |(x - mean)·a|; invstd = 1/sqrt(var + eps) carries 5 roundings (eps, add, sqrt, divide,
  and one more for an rsqrt that is not correctly rounded);
* a result stored in a narrower dtype adds one rounding of that dtype (and half the
  subnormal spacing, where float16 values are subnormal); eager PyTorch rounds the
  normalized tensor too before the add, so the bound allows both;
* sums of gradients (grad_weight, grad_bias, the reductions of the training backward) are
  bounded by gamma(n) times the sum of |terms|, however much the terms cancel;
* the ReLU is 1-Lipschitz: the bound of the pre-activation bounds the output, and the
  gradient passes where the op's own mask says (the reference takes the op's decisions).

The float64 reference is itself a correct implementation in float64: its own bound (the
same formulas with u = 2^-53) is added to every bound. Eager PyTorch in the op's dtype must
meet the bound too (tests/helpers.py checks it: a failure there is a wrong derivation, not a
wrong kernel). Bounds are per element (per channel for per-channel results).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

# Merge levels and slack in the statistics' term counts (see module doc).
STATS_EXTRA_TERMS = 64


class Rounding(NamedTuple):
    """Unit roundoffs of one computation: `acc` of the accumulation dtype (float32, or float64
    for float64 data), `data` of the input/output dtype, `param` of weight, bias, running
    statistics and their gradients; `tiny`: half the subnormal spacing of the data dtype."""

    acc: float
    data: float
    param: float
    tiny: float


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def rounding(dtype: torch.dtype, param_dtype: torch.dtype | None = None,
             truncating_store: bool = False) -> Rounding:
    """The unit roundoffs of an op on `dtype` data with `param_dtype` parameters.
    `truncating_store`: the op's results are stored by truncation, not rounded to nearest (Triton's
    interpreter converts float32 to bfloat16 so, tests/helpers.py `store_truncates`): an error
    of up to one ulp, 2u, instead of half an ulp."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    param = param_dtype or acc
    info = torch.finfo(dtype)
    data = unit_roundoff(dtype) * (2 if truncating_store else 1)
    return Rounding(unit_roundoff(acc), data, max(unit_roundoff(param), unit_roundoff(acc)),
                    info.smallest_normal * info.eps / 2)


FLOAT64 = rounding(torch.float64)


def gamma(k: float | Tensor, u: float) -> float | Tensor:
    """Higham's gamma_k = k·u / (1 - k·u): the relative bound of k roundings."""
    return k * u / (1 - k * u)


def _c(t: Tensor) -> Tensor:
    """A per-channel vector broadcast over (N, C, H, W)."""
    return t.view(1, -1, 1, 1)


def _per_channel_sum(t: Tensor) -> Tensor:
    return t.sum(dim=(0, 2, 3))


@dataclass
class Norm:
    """One BatchNorm's arguments in float64 (None where absent), as F.batch_norm takes them."""

    x: Tensor
    weight: Tensor | None = None
    bias: Tensor | None = None
    running_mean: Tensor | None = None
    running_var: Tensor | None = None
    training: bool = False
    momentum: float = 0.1
    eps: float = 1e-5

    @property
    def count(self) -> int:
        return self.x.shape[0] * self.x.shape[2] * self.x.shape[3]

    def w(self) -> Tensor:
        return torch.ones(self.x.shape[1], dtype=torch.float64, device=self.x.device) \
            if self.weight is None else self.weight.double()

    def b(self) -> Tensor:
        return torch.zeros(self.x.shape[1], dtype=torch.float64, device=self.x.device) \
            if self.bias is None else self.bias.double()


@dataclass
class Stats:
    """The exact (float64) mean, variance and invstd one BatchNorm normalizes with, and the
    bounds of their computed values' errors."""

    mean: Tensor
    var: Tensor
    invstd: Tensor
    e_mean: Tensor
    e_var: Tensor
    e_invstd: Tensor


def stats_error(x: Tensor, u: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(mean, biased var, bound of the mean's error, bound of the variance's error) per
    channel of x (float64), for statistics computed with unit roundoff u (module doc)."""
    n = x.shape[0] * x.shape[2] * x.shape[3]
    mean = x.mean(dim=(0, 2, 3))
    var = x.var(dim=(0, 2, 3), unbiased=False)
    e_mean = gamma(n + STATS_EXTRA_TERMS, u) * x.abs().amax(dim=(0, 2, 3))
    rms = (var + mean * mean).sqrt()
    e_var = gamma(2 * n + STATS_EXTRA_TERMS, u) * var.sqrt() * rms + e_mean * e_mean
    return mean, var, e_mean, e_var


def invstd_error(var: Tensor, e_var: Tensor, eps: float, u: float) -> tuple[Tensor, Tensor]:
    """invstd = 1/sqrt(var + eps) and the bound of its computed value's error, from a variance
    off by at most e_var (exactly, not to first order: infinite when e_var >= var + eps)."""
    denom = var + eps
    invstd = denom.rsqrt()
    shrink = (1 - e_var / denom).clamp_min(0)
    e_invstd = invstd * (shrink.rsqrt() - 1) + 5 * u * invstd
    return invstd, torch.nan_to_num(e_invstd, nan=float("inf"), posinf=float("inf"))


def norm_stats(norm: Norm, rd: Rounding, mean: Tensor | None = None, var: Tensor | None = None) -> Stats:
    """The statistics `norm` normalizes with: the batch's in training (computed: errors per
    `stats_error`), else the running statistics (exact inputs); or `mean`/`var` given exactly
    (a primitive op's arguments)."""
    zero = torch.zeros(norm.x.shape[1], dtype=torch.float64, device=norm.x.device)
    if mean is not None:
        m, v, e_m, e_v = mean.double(), var.double(), zero, zero
    elif norm.training:
        m, v, e_m, e_v = stats_error(norm.x, rd.acc)
    else:
        m, v, e_m, e_v = norm.running_mean.double(), norm.running_var.double(), zero, zero
    invstd, e_invstd = invstd_error(v, e_v, norm.eps, rd.acc)
    return Stats(m, v, invstd, e_m, e_v, e_invstd)


def normalized(norm: Norm, st: Stats, rd: Rounding) -> tuple[Tensor, Tensor]:
    """(y, bound) of y = (x - mean)·invstd·w + bias, computed in the accumulation dtype from
    the computed statistics: their errors carried through, and the roundings of either
    formulation (module doc); not yet rounded to the output dtype."""
    w, b = _c(norm.w()), _c(norm.b())
    xmu = norm.x - _c(st.mean)
    a = _c(st.invstd) * w.abs()
    y = xmu * _c(st.invstd) * w + b
    carried = a * _c(st.e_mean) + xmu.abs() * w.abs() * _c(st.e_invstd)
    local = 4 * rd.acc * ((norm.x.abs() + _c(st.mean.abs()) + xmu.abs()) * a + b.abs())
    return y, carried + local


def running_stats_bounds(norm: Norm, st: Stats, rd: Rounding) -> tuple[Tensor, Tensor]:
    """Bounds of the updated running mean and running variance (unbiased batch variance, as
    F.batch_norm), from the computed statistics."""
    m, n = norm.momentum, norm.count
    rm, rv = norm.running_mean.double(), norm.running_var.double()
    unbias = n / (n - 1)
    e_rm = m * st.e_mean + 4 * rd.param * ((1 - m) * rm.abs() + m * st.mean.abs())
    e_rv = m * unbias * st.e_var + 5 * rd.param * ((1 - m) * rv.abs() + m * unbias * st.var)
    return e_rm, e_rv


def backward_bounds(norm: Norm, st: Stats, dy: Tensor, rd: Rounding,
                    split_sums: bool = False) -> dict[str, Tensor]:
    """Bounds of grad_input, grad_weight and grad_bias of one BatchNorm, given dy (the
    gradient of its output after the ReLU mask, exact) and its computed statistics.

    Training: grad_input = w·invstd·(dy - A - (x - mean)·invstd^2·B), A = sum(dy)/n,
    B = sum(dy·(x - mean))/n; the sums over n terms (gamma(n), the mean's error carried into
    the second). Eval: grad_input = dy·w·invstd. grad_weight = sum(dy·(x - mean))·invstd,
    grad_bias = sum(dy); `split_sums`: these two are sums of per-process results, each
    rounded to the parameter dtype (synchronized BatchNorm under DDP): one more rounding of
    each part, at most u·sum|terms| in all."""
    n = norm.count
    w = _c(norm.w())
    s, e_s = _c(st.invstd), _c(st.e_invstd)
    xmu = norm.x - _c(st.mean)
    s1, s2 = _per_channel_sum(dy), _per_channel_sum(dy * xmu)
    abs_dy, abs_dy_xmu = _per_channel_sum(dy.abs()), _per_channel_sum((dy * xmu).abs())
    e_s1 = gamma(n, rd.acc) * abs_dy
    e_s2 = gamma(n + 2, rd.acc) * abs_dy_xmu + st.e_mean * (s1.abs() + e_s1)
    grad_weight = s2 * st.invstd
    out = {
        "grad_bias": e_s1 + rd.param * s1.abs(),
        "grad_weight": s2.abs() * st.e_invstd + st.invstd * e_s2 + (rd.acc + rd.param) * grad_weight.abs(),
    }
    if split_sums:
        out["grad_bias"] = out["grad_bias"] + rd.param * abs_dy
        out["grad_weight"] = out["grad_weight"] + (rd.acc + rd.param) * st.invstd * abs_dy_xmu
    if norm.training:
        out["grad_input"] = training_grad_input_bound(norm, st, dy, s1, s2, e_s1, e_s2, n, rd)
    else:
        gi = dy * w * s
        out["grad_input"] = dy.abs() * w.abs() * e_s + 2 * rd.acc * gi.abs() + rd.data * gi.abs() + rd.tiny
    return out


def training_grad_input_bound(norm: Norm, st: Stats, dy: Tensor, s1: Tensor, s2: Tensor, e_s1: Tensor,
                              e_s2: Tensor, n: int, rd: Rounding) -> Tensor:
    """Bound of grad_input = w·invstd·(dy - A - (x - mean)·invstd^2·B) in training, A = s1/n and
    B = s2/n from sums off by at most e_s1 and e_s2 (0: given exactly, bn_backward_apply's
    arguments), with the statistics' errors carried."""
    w, s, e_s = _c(norm.w()), _c(st.invstd), _c(st.e_invstd)
    xmu = norm.x - _c(st.mean)
    e_a, e_b = _c(e_s1 / n + rd.acc * (s1 / n).abs()), _c(e_s2 / n + rd.acc * (s2 / n).abs())
    a, b = _c(s1 / n), _c(s2 / n)
    gi = w * s * (dy - a - xmu * s * s * b)
    carried = (w.abs() * s * e_a + w.abs() * s**3 * xmu.abs() * e_b + w.abs() * s**3 * b.abs() * _c(st.e_mean)
               + w.abs() * ((dy - a).abs() + 3 * s * s * xmu.abs() * b.abs()) * e_s)
    local = 8 * rd.acc * w.abs() * s * (dy.abs() + a.abs() + s * s * xmu.abs() * b.abs())
    return carried + local + rd.data * gi.abs() + rd.tiny


def output_bound(parts: list[tuple[Tensor, Tensor]], residual: Tensor | None, rd: Rounding) -> Tensor:
    """Bound of relu(sum of normalized parts [+ residual]) in the data dtype: the parts'
    bounds, the adds in acc, and the output rounding (and eager's rounding of each part)."""
    r = residual.double() if residual is not None else torch.zeros((), dtype=torch.float64)
    y = sum(p for p, _ in parts) + r
    bound = sum(e for _, e in parts) + rd.acc * (y.abs() + r.abs())
    rounded = sum(p.abs() for p, _ in parts) + y.abs()
    return bound + rd.data * rounded + (len(parts) + 1) * rd.tiny


def _both(fn, *args) -> dict[str, Tensor]:
    """fn's bounds in the op's rounding plus those of the float64 reference."""
    *lead, rd = args
    mine, ref = fn(*lead, rd), fn(*lead, FLOAT64)
    return {k: mine[k] + ref[k] for k in mine}


def _bn_add_relu(norms: list[Norm], residual: Tensor | None, dy: Tensor | None, split_sums: bool,
                 rd: Rounding) -> dict:
    if norms[0].x.numel() == 0:  # nothing computed: every result exact (empty, or unchanged, or 0)
        keys = ["output", "grad_residual"] + [f"{k}{'2' if i else ''}" for i in range(len(norms)) for k in (
            "running_mean", "running_var", "grad_input", "grad_weight", "grad_bias")]
        return dict.fromkeys(keys, torch.zeros((), dtype=torch.float64))
    stats = [norm_stats(nm, rd) for nm in norms]
    out = {"output": output_bound([normalized(nm, st, rd) for nm, st in zip(norms, stats, strict=True)],
                                  residual, rd)}
    for i, (nm, st) in enumerate(zip(norms, stats, strict=True)):
        suffix = "2" if i else ""
        if nm.training and nm.running_mean is not None:
            out[f"running_mean{suffix}"], out[f"running_var{suffix}"] = running_stats_bounds(nm, st, rd)
        if dy is not None:
            for key, value in backward_bounds(nm, st, dy, rd, split_sums).items():
                out[key + suffix] = value
    if dy is not None:
        out["grad_residual"] = torch.zeros_like(dy)  # dy itself: exact
    return out


def bn_add_relu_bounds(x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None,
                       running_mean: Tensor | None, running_var: Tensor | None, training: bool,
                       momentum: float, eps: float, dy: Tensor | None = None,
                       param_dtype: torch.dtype | None = None, split_sums: bool = False,
                       truncating_store: bool = False) -> dict[str, Tensor]:
    """Bounds of every result of relu(batch_norm(x) + residual) and its backward, for an op in
    x's dtype: "output", "running_mean", "running_var", and given dy (the output gradient
    times the op's mask) "grad_input", "grad_residual", "grad_weight", "grad_bias"
    (`split_sums`: see `backward_bounds`; `truncating_store`: see `rounding`)."""
    norm = Norm(x.double(), weight, bias, running_mean, running_var, training, momentum, eps)
    rd = rounding(x.dtype, param_dtype or (weight.dtype if weight is not None else None), truncating_store)
    r = residual.double() if residual is not None else None
    d = dy.double() if dy is not None else None
    return _both(_bn_add_relu, [norm], r, d, split_sums, rd)


def dual_bounds(norm: Norm, norm2: Norm, dtype: torch.dtype, dy: Tensor | None = None,
                param_dtype: torch.dtype | None = None, split_sums: bool = False,
                truncating_store: bool = False) -> dict[str, Tensor]:
    """Bounds of relu(batch_norm(x) + batch_norm(x2)) and its backward (keys of the second
    BatchNorm end in "2"); the Norms hold float64 copies of the arguments."""
    rd = rounding(dtype, param_dtype, truncating_store)
    d = dy.double() if dy is not None else None
    out = _both(_bn_add_relu, [norm, norm2], None, d, split_sums, rd)
    out.pop("grad_residual", None)
    return out


# --------------------------------------------------------------------------------------------
# The primitive ops of the op layer (docs/op_layer.md), each on its own exact arguments
# --------------------------------------------------------------------------------------------


def _primitive(name: str, args: tuple, rd: Rounding) -> list[Tensor | None]:
    from fused_residual.reference import unpack_mask, working_layout

    def d(t):
        return None if t is None else t.double()

    if name == "stats":
        _, _, e_mean, e_var = stats_error(d(args[0]), rd.acc)
        return [e_mean, e_var]
    if name == "update_running_stats":
        mean, var, count, rm, rv, m = args
        unbias = count / (count - 1)
        return [4 * rd.param * ((1 - m) * d(rm).abs() + m * d(mean).abs()),
                5 * rd.param * ((1 - m) * d(rv).abs() + m * unbias * d(var).abs())]
    if name == "apply":
        x, r, mean, var, w, b, eps, _ = args
        norm = Norm(d(x), w, b, eps=eps)
        return [output_bound([normalized(norm, norm_stats(norm, rd, mean, var), rd)], r, rd), None]
    if name == "dual_apply":
        x, mean, var, w, b, x2, mean2, var2, w2, b2, eps, eps2, _ = args
        parts = []
        for xx, mm, vv, ww, bb, ee in ((x, mean, var, w, b, eps), (x2, mean2, var2, w2, b2, eps2)):
            norm = Norm(d(xx), ww, bb, eps=ee)
            parts.append(normalized(norm, norm_stats(norm, rd, mm, vv), rd))
        return [output_bound(parts, None, rd), None]
    g, mask, x = args[:3]
    bits = unpack_mask(mask, x.shape, working_layout(x))
    dy = torch.where(bits, d(g), torch.zeros((), dtype=torch.float64, device=g.device))
    if name == "backward_reduce":
        _, _, _, mean, var, eps = args
        norm = Norm(d(x), eps=eps, training=True)
        st = norm_stats(norm, rd, mean, var)
        xmu = norm.x - _c(st.mean)
        n = norm.count
        e_s1 = gamma(n, rd.acc) * _per_channel_sum(dy.abs())
        e_s2 = gamma(n + 2, rd.acc) * _per_channel_sum((dy * xmu).abs())
        s2 = _per_channel_sum(dy * xmu)
        return [e_s1, e_s2, s2.abs() * st.e_invstd + st.invstd * e_s2 + rd.acc * (s2 * st.invstd).abs()]
    _, _, _, mean, var, w, sum_dy, sum_dy_xmu, eps, count, _, _ = args
    norm = Norm(d(x), w, eps=eps, training=sum_dy is not None)
    st = norm_stats(norm, rd, mean, var)
    if sum_dy is None:
        grad_input = backward_bounds(norm, st, dy, rd)["grad_input"]
    else:  # the sums are the op's arguments, exact
        zero = torch.zeros_like(st.mean)
        grad_input = training_grad_input_bound(norm, st, dy, d(sum_dy), d(sum_dy_xmu), zero, zero, count, rd)
    return [grad_input, torch.zeros_like(dy)]


def primitive_bounds(name: str, args: tuple, truncating_store: bool = False) -> list[Tensor | None]:
    """Bounds of each result of primitive op `name` ("stats", "update_running_stats" (the
    updated running mean and variance), "apply", "dual_apply", "backward_reduce",
    "backward_apply") on `args`, the op's own arguments; None for a packed mask (checked bit
    for bit instead). The float64 reference's bound is included. `truncating_store`: see
    `rounding`."""
    x = args[2] if name.startswith("backward") else args[0]
    param = args[3] if name == "update_running_stats" else None
    rd = rounding(x.dtype, param.dtype if param is not None else None, truncating_store)
    mine, ref = _primitive(name, args, rd), _primitive(name, args, FLOAT64)
    return [None if a is None else a + b for a, b in zip(mine, ref, strict=True)]
