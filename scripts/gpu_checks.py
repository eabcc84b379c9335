"""The GPU checks of the first GPU run that pytest does not already make (scripts/gpu_check.sh
runs each as a step; each prints `RESULT <check>: ...`, with FAIL in it when it failed, and
exits non-zero then):

    python scripts/gpu_checks.py extension [--device cuda]   # available_backends + one op call
    python scripts/gpu_checks.py reference --backends extension triton
    python scripts/gpu_checks.py graph --backends extension triton
    python scripts/gpu_checks.py compile

* extension: available_backends("cuda") and one bn_add_relu forward + backward through the
  extension's CUDA kernels: a "no kernel image" (wrong TORCH_CUDA_ARCH_LIST) or an undefined
  symbol against the running torch shows here, before anything else needs the extension.
* reference: fp32 training forward + backward of bn_add_relu and dual_bn_add_relu per
  backend, layout and shape against a float64 truth on the same inputs; per result the worst
  error as a fraction of its bound, derived from the computation (tests/bounds.py, the rule
  the test suite asserts: unit roundoff x the sum of |terms| of each result, plus the float64
  reference's own), and eager PyTorch's fraction beside it (it must meet the same bound). Not
  "twice eager's error": at a few elements per channel that is one scalar's luck, and
  passes or fails by CPU. ReLU decisions of both references follow the fused output.
* graph: a training step (forward, running-stat update, backward) captured in a CUDA graph
  and replayed: bitwise what the same step gives eagerly (the kernels are deterministic).
* compile: torch.compile(fullgraph=True) of a FusedResidualBlock training step on the Triton
  backend (the wrap_triton path): output and gradients against eager, and Inductor's
  "assuming every input is mutated" warning (its mutation analysis of a Triton kernel failed,
  so it copies every input), counted from the torch._dynamo logger: FAIL if it appears.

On a machine without a GPU, `--device cpu` runs extension and reference on the CPU kernels
and Triton's interpreter (tests/test_gpu_check.py does, so the code runs before the GPU does).
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import fused_residual

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from bounds import Norm, bn_add_relu_bounds, dual_bounds

MUTATION_WARNING = "assuming every input is mutated"


def result(check: str, text: str, ok: bool) -> bool:
    print(f"RESULT {check}: {text}{'' if ok else ' | FAIL'}", flush=True)
    return ok


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# -- extension --------------------------------------------------------------------------------


def check_extension(device: str, backends: list[str]) -> bool:
    from fused_residual import backends as registry
    from fused_residual import ops

    available = fused_residual.available_backends(device)
    info = ops.BUILD_INFO
    print(
        f"available_backends({device!r}) = {available}; extension: "
        f"{registry.why_unavailable('extension', device) or 'available'}; built for "
        f"{getattr(info, 'CUDA_ARCHS', None)} against torch {getattr(info, 'TORCH_VERSION', None)}"
    )
    if "extension" not in available:
        return result(
            "extension", f"not available on {device}: {registry.why_unavailable('extension', device)}", False
        )
    torch.manual_seed(0)
    x = torch.randn(4, 16, 5, 5, device=device, requires_grad=True)
    r = torch.randn_like(x)
    w = torch.rand(16, device=device, requires_grad=True)
    b = torch.randn(16, device=device, requires_grad=True)
    rm, rv = torch.zeros(16, device=device), torch.ones(16, device=device)
    start = time.perf_counter()
    out = fused_residual.bn_add_relu(x, r, rm, rv, w, b, True, 0.1, 1e-5, backend="extension")
    out.backward(torch.ones_like(out))
    _sync(device)
    took = time.perf_counter() - start
    eager = F.relu(F.batch_norm(x.detach(), None, None, w.detach(), b.detach(), True, 0.1, 1e-5) + r)
    diff = (out.detach() - eager).abs().max().item()
    ok = diff < 1e-4 and bool(torch.isfinite(x.grad).all())
    return result(
        "extension",
        f"available_backends({device!r}) = {available}; bn_add_relu forward + "
        f"backward ran in {took:.2f} s, max |out - eager| {diff:.1e}",
        ok,
    )


# -- reference comparisons ------------------------------------------------------------------------


def _fraction(got, truth, bound) -> float:
    """worst |got - truth| / bound elementwise; inf where non-finite values differ."""
    truth, got = truth.double(), got.double()
    finite = torch.isfinite(truth)
    if not torch.equal(torch.isfinite(got), finite):
        return float("inf")
    if not finite.any():
        return 0.0
    bound = torch.as_tensor(bound, dtype=torch.float64, device=truth.device).expand(truth.shape)
    return ((got - truth).abs() / bound)[finite].nan_to_num(nan=0.0, posinf=float("inf")).max().item()


def _bounds(kind: str, inputs: list, params: list, stats: list, dy) -> list:
    """The derived bound of each result of `_step` (out, input grads, param grads, stats), for
    an fp32 training call on these fp32 arguments with the output gradient `dy` (times the
    op's ReLU mask)."""
    if kind == "bn_add_relu":
        (x, r), (w, b), (rm, rv) = inputs, params, stats
        bd = bn_add_relu_bounds(x, r, w, b, rm, rv, True, 0.1, 1e-5, dy)
        keys = ["output", "grad_input", "grad_residual", "grad_weight", "grad_bias"]
        return [bd[k] for k in [*keys, "running_mean", "running_var"]]
    first, second = (
        Norm(x.double(), w.double(), b.double(), rm.double(), rv.double(), True, 0.1, 1e-5)
        for x, w, b, rm, rv in zip(inputs, params[0::2], params[1::2], stats[0::2], stats[1::2], strict=True)
    )
    bd = dual_bounds(first, second, torch.float32, dy)
    keys = ["output", "grad_input", "grad_input2", "grad_weight", "grad_bias", "grad_weight2", "grad_bias2"]
    return [bd[k] for k in [*keys, "running_mean", "running_var", "running_mean2", "running_var2"]]


def _output_grad(out):
    g = torch.Generator().manual_seed(1)
    return torch.randn(out.shape, generator=g).to(out.device, out.dtype)


def _step(fn, inputs: list, params: list, stats: list):
    """fn(*inputs, *params, *stats) forward + backward: (output, grads of inputs and params, stats)."""
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    params = [t.detach().clone().requires_grad_(True) for t in params]
    stats = [t.clone() for t in stats]
    out = fn(inputs, params, stats)
    out.backward(_output_grad(out))
    return out.detach(), [t.grad for t in inputs + params], stats


def _reference_cases(device: str, quick: bool):
    shapes = [(2, 3, 5, 7)] if quick else [(2, 3, 5, 7), (8, 64, 28, 28), (32, 256, 14, 14), (16, 512, 7, 7)]
    for shape in shapes:
        for layout in (torch.contiguous_format, torch.channels_last):
            g = torch.Generator().manual_seed(hash(shape) % 2**31)
            c = shape[1]
            x, x2 = (_activations(shape, g).to(device).contiguous(memory_format=layout) for _ in range(2))
            r = torch.randn(shape, generator=g).to(device).contiguous(memory_format=layout)
            params = [torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g) * 0.5]
            stats = [torch.randn(c, generator=g) * 0.1, torch.rand(c, generator=g) + 0.5]
            name = f"{'x'.join(map(str, shape))} {'cl' if layout == torch.channels_last else 'nchw'}"
            yield name, x, x2, r, [p.to(device) for p in params], [s.to(device) for s in stats]


def _activations(shape, g: torch.Generator) -> torch.Tensor:
    """Values with a per-channel offset of about 1 and spread 2 (BatchNorm's inputs)."""
    return torch.randn(shape, generator=g) * 2 + torch.randn(1, shape[1], 1, 1, generator=g)


def _single(backend):
    def fn(inputs, params, stats):
        x, r = inputs
        if backend is None:  # eager, ReLU decisions from `bits` (set below)
            y = F.batch_norm(x, stats[0], stats[1], params[0], params[1], True, 0.1, 1e-5) + r
            return torch.where(fn.bits.to(y.device) | torch.isnan(y), y, torch.zeros_like(y))
        return fused_residual.bn_add_relu(
            x, r, stats[0], stats[1], params[0], params[1], True, 0.1, 1e-5, backend=backend
        )

    return fn


def _dual(backend):
    def fn(inputs, params, stats):
        x, x2 = inputs
        if backend is None:
            y = F.batch_norm(x, stats[0], stats[1], params[0], params[1], True, 0.1, 1e-5) + F.batch_norm(
                x2, stats[2], stats[3], params[2], params[3], True, 0.1, 1e-5
            )
            return torch.where(fn.bits.to(y.device) | torch.isnan(y), y, torch.zeros_like(y))
        return fused_residual.dual_bn_add_relu(
            x,
            stats[0],
            stats[1],
            params[0],
            params[1],
            x2,
            stats[2],
            stats[3],
            params[2],
            params[3],
            True,
            0.1,
            1e-5,
            backend=backend,
        )

    return fn


def check_reference(device: str, backends: list[str], quick: bool) -> bool:
    worst: dict[str, tuple[float, str]] = {}
    for case, x, x2, r, params, stats in _reference_cases(device, quick):
        for kind, make_fn, inputs, ps, ss in (
            ("bn_add_relu", _single, [x, r], params, stats),
            ("dual", _dual, [x, x2], params + [p.flip(0) for p in params],
             stats + [s.flip(0) for s in stats]),
        ):
            names = [
                "out",
                "grad_input",
                "grad_2nd_input",
                *(f"grad_param{i}" for i in range(len(ps))),
                *(f"stat{i}" for i in range(len(ss))),
            ]
            for backend in backends:
                fused = _step(make_fn(backend), inputs, ps, ss)
                reference = make_fn(None)
                reference.bits = fused[0] > 0
                eager = _step(reference, inputs, ps, ss)
                truth = _step(reference, *([t.double() for t in ts] for ts in (inputs, ps, ss)))
                dy = torch.where(reference.bits, _output_grad(fused[0]), 0.0)
                bounds = _bounds(kind, inputs, ps, ss, dy)
                values = (
                    [fused[0], *fused[1], *fused[2]],
                    [eager[0], *eager[1], *eager[2]],
                    [truth[0], *truth[1], *truth[2]],
                )
                for name, f, e, t, bound in zip(names, *values, bounds, strict=True):
                    frac, what = _fraction(f, t, bound), f"{kind} {case} {name}"
                    eager_frac = _fraction(e, t, bound)
                    print(f"{backend:10} {what:45} {frac:6.3f} of its bound (eager {eager_frac:.3f})")
                    for who, fraction in ((backend, frac), ("eager PyTorch", eager_frac)):
                        if fraction >= worst.get(who, (-1.0, ""))[0]:
                            worst[who] = (fraction, what)
    _sync(device)
    # eager PyTorch in fp32 computes as tests/bounds.py assumes: past its bound means a wrong
    # derivation, which fails the check as a wrong kernel does.
    text = "; ".join(f"{b}: worst {f:.2f} of bound ({w})" for b, (f, w) in worst.items())
    return result("reference", f"fp32 {text}", all(f <= 1.0 for f, _ in worst.values()))


# -- CUDA graph ------------------------------------------------------------------------------------


def _training_step(module, x, r, grad) -> tuple:
    out = module(x, r)
    return (out, *torch.autograd.grad(out, (x, r, module.weight, module.bias), grad))


def check_graph(backends: list[str]) -> bool:
    outcomes, ok = [], True
    for backend in backends:
        torch.manual_seed(0)
        bn = fused_residual.BatchNormAddReLU2d(16, backend=backend).cuda()
        twin = copy.deepcopy(bn)
        x = torch.randn(4, 16, 7, 7, device="cuda", requires_grad=True)
        r = torch.randn_like(x, requires_grad=True)
        grad = torch.randn_like(x)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up outside the capture: JIT, allocator
                _training_step(bn, x, r, grad)
                _training_step(twin, x, r, grad)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = _training_step(bn, x, r, grad)
        graph.replay()
        expected = _training_step(twin, x, r, grad)
        torch.cuda.synchronize()
        same = (
            all(torch.equal(a, b) for a, b in zip(captured, expected, strict=True))
            and torch.equal(bn.running_mean, twin.running_mean)
            and torch.equal(bn.running_var, twin.running_var)
        )
        ok &= same
        outcomes.append(f"{backend} {'bitwise equal to eager' if same else 'DIFFERS from eager'}")
    return result("graph", "captured training step replayed: " + "; ".join(outcomes), ok)


# -- torch.compile -----------------------------------------------------------------------------------


class _Count(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.hits = 0

    def emit(self, record):
        self.hits += MUTATION_WARNING in record.getMessage()


def check_compile(device: str, backend: str = "triton") -> bool:
    counter = _Count()
    # torch/_higher_order_ops/triton_kernel_wrap.py logs it on "torch._dynamo" (2.11 to 2.14),
    # which torch's logging setup may keep from propagating to "torch".
    logging.getLogger("torch._dynamo").addHandler(counter)
    torch.manual_seed(0)
    eager = fused_residual.FusedResidualBlock(16, 32, stride=2, backend=backend).to(device).train()
    module = copy.deepcopy(eager)
    compiled = torch.compile(module, fullgraph=True, dynamic=False)
    x = torch.randn(8, 16, 14, 14, device=device)
    worst, start = 0.0, time.perf_counter()
    for _ in range(2):
        xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        out_e, out_c = eager(xe), compiled(xc)
        grad = torch.randn_like(out_e)
        out_e.backward(grad)
        out_c.backward(grad)
        pairs = [
            (out_c, out_e),
            (xc.grad, xe.grad),
            *((pc.grad, pe.grad) for pe, pc in zip(eager.parameters(), module.parameters(), strict=True)),
            *zip(module.buffers(), eager.buffers(), strict=True),
        ]
        worst = max(
            worst, *((a.double() - b.double()).abs().max().item() for a, b in pairs if a.is_floating_point())
        )
    _sync(device)
    ok = worst < 1e-3 and counter.hits == 0
    return result(
        "compile",
        f"FusedResidualBlock training step, {backend} backend, fullgraph: compiled and ran "
        f"twice in {time.perf_counter() - start:.0f} s, max |compiled - eager| {worst:.1e}; Inductor's "
        f"'{MUTATION_WARNING}' warning {counter.hits} times",
        ok,
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("check", choices=["extension", "reference", "graph", "compile"])
    parser.add_argument("--backends", nargs="+", default=["extension", "triton"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="the small shapes only (CPU)")
    parser.add_argument("--compile-backend", default="triton", help="compile: the block's backend")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        return 0 if result(args.check, "no CUDA GPU visible", False) else 1
    if args.check == "extension":
        ok = check_extension(args.device, args.backends)
    elif args.check == "reference":
        ok = check_reference(args.device, args.backends, args.quick)
    elif args.check == "graph":
        ok = check_graph(args.backends)
    else:
        ok = check_compile(args.device, args.compile_backend)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
