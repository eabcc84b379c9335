"""fused_residual.convert on real torchvision ResNets: the structure of the converted model, and
its numerics, in two exact-or-derived parts (tests/model_checks.py).

Why not the converted model's outputs and gradients against float64 under one bound. A whole
ResNet in training amplifies rounding noise enormously: BatchNorm backward over a handful of
values per channel (N·H·W = 8 in layer4 at 64x64 inputs) and dozens of stacked blocks turn
last-place differences into relative gradient errors of 1e-4 in eager float32 itself, and a
pre-ReLU value within that noise of 0 flips its ReLU in one float32 run and not in the other.
A bound derived from the computation (first order: each op's rounding times the model's
sensitivity to it) is ~1e5 times the float32 error there, so it would pass a wrong kernel;
"2x eager's error" is one draw of that noise and passes or fails by CPU. So:

* structure: convert() with the "reference" backend (eager PyTorch ops) equals the original
  model bit for bit, outputs, input and parameter gradients and running statistics, over
  training steps and in eval (`assert_reference_conversion_is_original`);
* numerics: with each fused backend, every fused primitive op the converted model calls is
  checked on its own arguments against float64 under its derived bound, its mask against its
  output, and the running statistics it updates are the model's buffers (`FusedOpAudit`);
  the fused backends' composition of those ops is checked in tests/test_functional.py and
  test_dual.py.

Whole models run at 64x64 (8 values per channel in layer4); the old figure, the converted
model's error against float64 beside eager's, is printed by `report_against_float64`.
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
import warnings

import pytest
import torch
import torch.nn as nn
from helpers import DEVICE, FUSED_BACKENDS, is_slow
from torch.utils._python_dispatch import TorchDispatchMode

import fused_residual
from fused_residual._blocks import FoldedReLU

tv = pytest.importorskip("torchvision")
from model_checks import FusedOpAudit, assert_reference_conversion_is_original, step  # noqa: E402

# The extension (and "auto", which picks it on CPU) on whole models; the Triton backend,
# interpreted on CPU (~1 s per block step), on a few blocks at tiny sizes.
FAST = [b for b in FUSED_BACKENDS if not is_slow(b)]


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """BatchNorm weights and biases away from 1 and 0 (so a swapped or dropped affine term
    shows), running statistics away from 0 and 1 (so eval mode uses them visibly)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.rand(c, generator=g) - 0.5)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return model


def build(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize(getattr(tv.models, arch)(num_classes=10), seed).to(DEVICE)


def triple(arch: str, backend: str, seed: int = 0):
    """(converted, original, float64 original), the same weights and statistics."""
    original = build(arch, seed)
    truth = copy.deepcopy(original).double()
    fused = fused_residual.convert(copy.deepcopy(original), backend=backend)
    return fused, original, truth


def report_against_float64(name: str, fused: nn.Module, original: nn.Module, x: torch.Tensor) -> str:
    """The old rule's figure, printed (not a gate, see module doc): the max error of the output
    of one training-mode forward against a float64 copy of `original`, converted and eager."""
    truth = copy.deepcopy(original).double()
    with torch.no_grad():
        want = truth(x.double())
        errors = [(m(x).double() - want).abs().max().item()
                  for m in (copy.deepcopy(fused), copy.deepcopy(original))]
    line = f"{name}: output error against float64: converted {errors[0]:.2e}, eager {errors[1]:.2e}"
    print(line)
    return line


def check_converted(fused: nn.Module, original: nn.Module, x: torch.Tensor, training: bool,
                    steps: int = 1, expect_ops: tuple[str, ...] = ("apply",),
                    backward: bool = True) -> FusedOpAudit:
    """Structure and numerics of a converted model (module doc), `steps` forward + backward
    steps (forwards under no_grad without `backward`) in `training` mode: the reference
    conversion of `original` equals it bit for bit, and every fused op of `fused` meets its
    derived bound (each op of `expect_ops` called). Neither model is stepped: copies are."""
    def run(model):
        model.train(training)
        if backward:
            return step(model, x)
        with torch.no_grad():
            return model(x), dict(model.named_buffers())

    assert_reference_conversion_is_original(original, run, steps)
    model = copy.deepcopy(fused).train(training)
    with FusedOpAudit() as audit:
        for _ in range(steps):
            run(model)
    for op in expect_ops:
        assert audit.calls.get(op, 0) > 0, (op, audit.calls)
    if audit.calls.get("update_running_stats"):
        audit.assert_updated_buffers_of(model)
    return audit


# --------------------------------------------------------------------------------------------
# Structure
# --------------------------------------------------------------------------------------------


class OpCounter(TorchDispatchMode):
    """Counts the ops dispatched (fused_residual's custom ops and aten's batch norm)."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket).removeprefix("fused_residual.")
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("arch, blocks, dual", [("resnet18", 8, 3), ("resnet50", 16, 4)])
def test_structure_and_ops(arch, blocks, dual):
    """Same attribute names and state_dict keys; BatchNorms and blocks are swapped in place (the
    same Parameter objects); the forward runs only fused ops, the dual op once per
    downsampling block, and no aten batch_norm."""
    original = build(arch)
    params_before = {n: p for n, p in original.named_parameters()}
    keys = list(original.state_dict())
    names = [n for n, _ in original.named_modules()]
    model = fused_residual.convert(original, backend=FAST[0] if FAST else "reference")
    assert model is original
    assert list(model.state_dict()) == keys
    assert [n for n, _ in model.named_modules()] == names
    assert all(p is params_before[n] for n, p in model.named_parameters())
    assert isinstance(model.bn1, fused_residual.BatchNormAddReLU2d) and isinstance(model.relu, FoldedReLU)
    block_types = tv.models.resnet.BasicBlock | tv.models.resnet.Bottleneck
    fused_blocks = [m for m in model.modules() if isinstance(m, block_types)]
    assert len(fused_blocks) == blocks and all(type(b).__name__.startswith("Fused") for b in fused_blocks)
    for b in fused_blocks:  # the shortcut's BatchNorm stays a plain BatchNorm2d (its forward is never run)
        if b.downsample is not None:
            assert type(b.downsample[1]) is nn.BatchNorm2d
    if not FAST:
        return
    counter = OpCounter()
    x = torch.randn(2, 3, 32, 32, device=DEVICE, requires_grad=True)
    with counter:
        model(x).sum().backward()
    c = counter.counts
    bns_per_block = 2 if arch == "resnet18" else 3
    assert c.get("bn_dual_apply") == dual, c
    # Eager training: one composite op each way per single-BatchNorm tail (docs/op_layer.md);
    # a dual tail's forward is each norm's statistics, then one bn_dual_apply, and its
    # backward one bn_backward per norm.
    assert c.get("bn_train_forward") == 1 + blocks * bns_per_block - dual, c
    assert c.get("bn_stats") == c.get("bn_update_running_stats") == 2 * dual, c
    assert c.get("bn_backward") == 1 + blocks * bns_per_block + dual, c
    assert "bn_apply" not in c and "bn_backward_apply" not in c, c
    assert not any("batch_norm" in k or k in ("relu", "relu_", "threshold_backward") for k in c), c


# --------------------------------------------------------------------------------------------
# Numerics: whole models and every block
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_resnet18_matches_original(backend, training):
    """Two steps (the second from updated running statistics): structure bit for bit, and
    every fused op of the converted model within its derived bound (module doc)."""
    fused, original, _ = triple("resnet18", backend)
    x = torch.randn(2, 3, 64, 64, device=DEVICE)
    audit = check_converted(fused, original, x, training, steps=2,
                            expect_ops=("stats", "update_running_stats", "apply", "dual_apply",
                                        "backward_reduce", "backward_apply") if training else
                            ("apply", "dual_apply", "backward_reduce", "backward_apply"))
    # Per step: one apply op per norm of the stem and the 8 blocks (the 3 shortcut norms
    # inside dual ops).
    assert (audit.calls["apply"], audit.calls["dual_apply"]) == (2 * (1 + 16 - 3), 2 * 3)
    report_against_float64("resnet18", fused.train(training), original.train(training), x)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_resnet50_matches_original(backend, training):
    fused, original, _ = triple("resnet50", backend)
    x = torch.randn(2, 3, 64, 64, device=DEVICE)
    audit = check_converted(fused, original, x, training,
                            expect_ops=("apply", "dual_apply", "backward_apply"))
    assert (audit.calls["apply"], audit.calls["dual_apply"]) == (1 + 16 * 3 - 4, 4)


def small_block(kind: str, inplanes: int, planes: int, stride: int) -> nn.Module:
    """A torchvision BasicBlock / Bottleneck with few channels, with torchvision's
    Sequential(conv1x1, BatchNorm2d) shortcut when it changes shape."""
    cls = {"basic": tv.models.resnet.BasicBlock, "bottleneck": tv.models.resnet.Bottleneck}[kind]
    out = planes * cls.expansion
    downsample = None
    if stride != 1 or inplanes != out:
        downsample = nn.Sequential(tv.models.resnet.conv1x1(inplanes, out, stride), nn.BatchNorm2d(out))
    torch.manual_seed(0)
    return randomize(cls(inplanes, planes, stride, downsample)).to(DEVICE)


@pytest.mark.parametrize("backend", [b for b in FUSED_BACKENDS if is_slow(b)])
def test_blocks_interpreted_triton(backend):
    """The Triton backend under the interpreter (slow: few channels, tiny maps): downsampling
    blocks (the dual op) of both kinds in training and eval, an identity block in training."""
    cases = [(("basic", 8, 16, 2), (2, 8, 6, 6), (True, False)),
             (("basic", 16, 16, 1), (2, 16, 3, 3), (True,)),
             (("bottleneck", 8, 4, 2), (2, 8, 6, 6), (True, False))]
    for spec, shape, modes in cases:
        original = small_block(*spec)
        fused = fused_residual.convert(copy.deepcopy(original), backend=backend)
        x = torch.relu(torch.randn(shape, device=DEVICE))
        for training in modes:
            check_converted(fused, original, x, training, expect_ops=("apply", "backward_apply"))


@pytest.mark.parametrize("arch", ["resnext50_32x4d", "wide_resnet50_2"])
def test_other_resnets_convert_and_match(arch):
    """Construct, convert, a training step and an eval forward of the whole model (grouped /
    wide convs): structure bit for bit, the fused ops within their bounds."""
    backend = FAST[0] if FAST else "reference"
    fused, original, _ = triple(arch, backend)
    assert sum(type(m).__name__ == "FusedBottleneck" for m in fused.modules()) == 16
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    for training in (True, False):
        check_converted(fused, original, x, training, backward=training,
                        expect_ops=("apply", "dual_apply") if backend != "reference" else ())


@pytest.mark.parametrize("backend", FAST)
def test_channels_last(backend):
    """A channels_last model and input: the same structure and numerics, and channels_last
    activations throughout (the fused ops keep the working layout)."""
    fused, original, _ = triple("resnet18", backend)
    for m in (fused, original):
        m.to(memory_format=torch.channels_last).train()
    x = torch.randn(2, 3, 64, 64, device=DEVICE).contiguous(memory_format=torch.channels_last)
    check_converted(fused, original, x, True, expect_ops=("apply", "dual_apply", "backward_apply"))
    layouts = []
    fused.layer2[0].register_forward_hook(lambda m, i, o: layouts.append(o.is_contiguous(
        memory_format=torch.channels_last)))
    fused.bn1.register_forward_hook(lambda m, i, o: layouts.append(o.is_contiguous(
        memory_format=torch.channels_last)))
    got = step(fused, x)
    assert layouts == [True, True]
    assert got[1].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", FAST)
def test_autocast(backend, dtype):
    """Autocast to bfloat16 / float16: convs run in the low dtype and so do the fused tails.
    Structure: the reference conversion under autocast equals the original under autocast bit
    for bit (the residual cast to the low dtype as `out += identity` casts it). Numerics: every
    fused op sees low-precision activations and gradients with float32 parameters, and meets
    the bound of its dtype (one rounding to the low dtype at the end, float32 within)."""
    fused, original, _ = triple("resnet18", backend)
    x = torch.randn(2, 3, 64, 64, device=DEVICE)

    def run(model):
        with torch.autocast(DEVICE, dtype=dtype):
            result = step(model.train(), x)
        assert result[0].dtype == dtype
        return result

    assert_reference_conversion_is_original(original, run)
    with FusedOpAudit() as audit:
        run(copy.deepcopy(fused))
    assert (audit.calls["apply"], audit.calls["dual_apply"]) == (1 + 16 - 3, 3)
    assert audit.calls["backward_apply"] > 0


# --------------------------------------------------------------------------------------------
# Checkpoints, modes, errors
# --------------------------------------------------------------------------------------------


def test_state_dict_round_trip():
    """Checkpoints load strictly into a converted model and out of it, unchanged."""
    backend = FAST[0] if FAST else "reference"
    original = build("resnet18", seed=1)
    original.train()(torch.randn(2, 3, 32, 32, device=DEVICE))  # move the running stats
    fused = fused_residual.convert(build("resnet18", seed=2), backend=backend)
    fused.load_state_dict(original.state_dict(), strict=True)
    fused.train()(torch.randn(2, 3, 32, 32, device=DEVICE))  # and again, in the converted model
    back = build("resnet18", seed=3)
    back.load_state_dict(fused.state_dict(), strict=True)
    for (name, a), (_, b) in zip(fused.state_dict().items(), back.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    # And through a file, into a converted model and an original one (torch.save of the whole
    # converted model too: the fused classes are importable by name).
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ckpt.pt")
        torch.save({"state": fused.state_dict(), "model": fused}, path)
        loaded = torch.load(path, weights_only=False)
    again = fused_residual.convert(build("resnet18", seed=4), backend=backend)
    again.load_state_dict(loaded["state"], strict=True)
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    for m in (fused, again, back, loaded["model"]):
        m.eval()
    with torch.no_grad():
        assert torch.equal(fused(x), again(x)) and torch.equal(fused(x), loaded["model"](x))
        torch.testing.assert_close(back(x), fused(x), rtol=1e-4, atol=1e-5)


def test_modes_flags_and_dtype_carry_over():
    """Train/eval mode, requires_grad flags, dtype and device are those the model had."""
    original = build("resnet18").eval()
    original.layer1.requires_grad_(False)
    original.double()
    fused_residual.convert(original)
    assert not original.training and not original.layer2[0].bn2.training
    assert not any(p.requires_grad for p in original.layer1.parameters())
    assert all(p.requires_grad for p in original.layer2.parameters())
    assert all(p.dtype == torch.float64 for p in original.parameters())
    out = original(torch.randn(2, 3, 32, 32, device=DEVICE, dtype=torch.float64))
    assert out.dtype == torch.float64


def test_convert_again_changes_backend_and_stays_fused():
    model = fused_residual.convert(build("resnet18"), backend="reference")
    assert model.layer2[0].bn2.backend == "reference"
    fused_residual.convert(model, backend="auto")
    assert model.layer2[0].bn2.backend == "auto" and model.bn1.backend == "auto"
    assert type(model.layer2[0]).__name__ == "FusedBasicBlock"


def test_bad_input():
    with pytest.raises(TypeError, match=r"nn\.Module"):
        fused_residual.convert(tv.models.resnet18().state_dict())
    with pytest.raises(ValueError, match="unknown backend"):
        fused_residual.convert(tv.models.resnet18(), backend="cudnn")
    # Nothing to fuse (a LeakyReLU): the model comes back unchanged, with one warning.
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.LeakyReLU())
    with pytest.warns(RuntimeWarning, match="fused nothing in Sequential") as record:
        assert fused_residual.convert(plain) is plain
    assert len([w for w in record if "fused_residual" in str(w.message)]) == 1
    assert type(plain[1]) is nn.BatchNorm2d and type(plain[2]) is nn.LeakyReLU


def test_other_norm_layers_are_left_alone():
    """Blocks whose norms convert() does not fuse (GroupNorm) are left as they are, with one
    warning naming why when nothing at all was fused."""
    model = tv.models.resnet18(norm_layer=lambda c: nn.GroupNorm(4, c))
    with pytest.warns(RuntimeWarning, match="fused nothing in ResNet.*GroupNorm") as record:
        fused_residual.convert(model)
    assert len([w for w in record if "fused_residual" in str(w.message)]) == 1
    assert type(model.layer1[0]) is tv.models.resnet.BasicBlock
    assert type(model.bn1) is nn.GroupNorm and type(model.relu) is nn.ReLU


def test_other_shortcuts_and_hooks_keep_the_single_bn_path():
    """A shortcut ending in a BatchNorm after other modules (here ResNet-D's avg-pool shortcut)
    fuses into the dual op; one with a forward hook runs as a module (the hook fires). The
    values match either way."""
    backend = FAST[0] if FAST else "reference"
    block = randomize(tv.models.resnet.BasicBlock(8, 16, stride=2, downsample=nn.Sequential(
        nn.AvgPool2d(2), nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16)))).to(DEVICE)
    hooked = randomize(tv.models.resnet.BasicBlock(8, 16, stride=2, downsample=nn.Sequential(
        nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16)))).to(DEVICE)
    calls = []
    hooked.downsample[1].register_forward_hook(lambda m, i, o: calls.append(m))
    x = torch.randn(2, 8, 6, 6, device=DEVICE)
    for original in (block, hooked):
        fused = fused_residual.convert(copy.deepcopy(original), backend=backend)
        if backend == "reference":
            assert_reference_conversion_is_original(original, lambda m: step(m.train(), x))
        else:
            check_converted(fused, original, x, True, expect_ops=("apply",))
        step(fused.train(), x)
    assert any(m is fused.downsample[1] for m in calls)  # the converted block ran the hook


# --------------------------------------------------------------------------------------------
# torch.compile and DistributedDataParallel
# --------------------------------------------------------------------------------------------


def compile_and_compare(model: nn.Module, x: torch.Tensor) -> str:
    """torch.compile(model, fullgraph=True) (a graph break raises), one training forward +
    backward against an eager copy: output, input and parameter gradients, buffers. Returns
    the generated code."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, dynamic=False)

    def train_step(m, x):
        x = x.clone().requires_grad_(True)
        out = m(x)
        out.backward(torch.ones_like(out))
        return out, x.grad

    (out_c, gx_c), codes = run_and_get_code(train_step, compiled, x)
    out_e, gx_e = train_step(eager, x)
    # Inductor may reorder float32 sums in the convs around the fused ops: compare with
    # tolerances at the level of the eager model's own float32 noise.
    torch.testing.assert_close(out_c, out_e, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(gx_c, gx_e, rtol=1e-3, atol=1e-3)
    for (name, pc), pe in zip(model.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-2, atol=1e-3, msg=name)
    for (name, bc), be in zip(model.named_buffers(), eager.buffers(), strict=True):
        torch.testing.assert_close(bc, be, rtol=1e-4, atol=1e-5, msg=name)
    torch._dynamo.reset()
    return "\n".join(codes)


@pytest.mark.skipif(not FAST, reason="no compiled fused backend here")
def test_compile_fullgraph_forward_backward():
    """torch.compile(fullgraph=True) of a converted resnet18, forward and backward, with the
    fused ops (dual included) in the generated code and no graph break (fullgraph raises)."""
    model = fused_residual.convert(build("resnet18"), backend=FAST[0]).train()
    # 64x64: 8 values per channel in layer4 (at 32x32, 2 values make BatchNorm's backward
    # amplify rounding differences by orders of magnitude in any two float32 runs).
    code = compile_and_compare(model, torch.randn(2, 3, 64, 64, device=DEVICE))
    assert "fused_residual.bn_dual_apply" in code and "fused_residual.bn_backward_reduce" in code
    assert "batch_norm" not in code


_DDP_WORKER = os.path.join(os.path.dirname(__file__), "ddp_worker.py")


@pytest.mark.skipif(not torch.distributed.is_available() or DEVICE != "cpu",
                    reason="a CPU gloo test (torch.distributed missing or a GPU run)")
def test_distributed_data_parallel_gloo():
    """Two gloo processes train a converted resnet18 under DDP for two SGD steps; the
    gradients each rank holds must be the all-reduced average, equal on both ranks, and match
    (float64: summation order only) the average of the per-rank gradients of the original
    model run on each rank's half of the batch in one process; so must the parameters."""
    import subprocess

    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, _DDP_WORKER], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0 and "ddp ok" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]


def test_warnings_are_not_raised_for_a_plain_conversion():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused_residual.convert(build("resnet18"))
