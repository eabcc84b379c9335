"""fused_residual.convert on real torchvision ResNets: the converted model against the original
(a deepcopy taken before converting) and a float64 copy, under the tolerance rule.

Why most gradient checks are per block. A whole ResNet-50 in training amplifies rounding
noise enormously: BatchNorm backward over a handful of values per channel (N·H·W = 8 in
layer4 at 64x64 inputs) and dozens of stacked blocks turn last-place differences into
relative gradient errors of 1e-4 in eager float32 itself, and a pre-ReLU value within that
noise of 0 (|y| ~ 3e-5 happens) flips its ReLU in one float32 run and not in the other, which
moves a whole channel's gradient by ~1e-2. Which of two float32 runs is "luckier" is chance,
so "the fused model's error <= 2x eager's" over a whole deep network in training tests the
dice, not the kernels. So every block (and the stem) of the real model is checked on the
input the float64 model feeds it, rounded to float32: the fused block, the original block and
the float64 block all see the same input, and the rule applies to its output, input gradient,
parameter gradients and running statistics. Whole models are checked under the rule where
that is well posed: outputs and running statistics, every gradient of resnet18, and the input
gradient of resnet50 in eval mode (its parameter gradients, sums over hundreds of values of
a gradient that has crossed 50 layers, are checked per block).

Parameter gradients are sums, and the atol of the rule scales with what they sum: a conv
weight's n = N·H·W products (n·max|truth|), a BatchNorm weight's or bias's sum |dy·x̂| or
sum |dy| over the channel, taken from the float64 run (`BatchNormSumScales`): the gradient
dy a block's inner BatchNorm receives has crossed the layers above it, so the fused and the
eager model feed it terms that differ by an ulp or so each, and the sum's difference is
bounded by that ulp times the sum of the magnitudes, not of the (cancelling) result.
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
from helpers import DEVICE, FUSED_BACKENDS, assert_within_rule, is_slow
from torch.utils._python_dispatch import TorchDispatchMode

import fused_residual
from fused_residual._blocks import FoldedReLU

tv = pytest.importorskip("torchvision")

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


class BatchNormSumScales:
    """While active, records for every nn.BatchNorm2d of a (float64) model the magnitude of
    what its parameter gradients sum: max over channels of sum |dy * xhat| (weight) and of
    sum |dy| (bias), dy the gradient of the BatchNorm's output. A gradient fed to the
    BatchNorm that differs by one ulp per term moves such a sum by up to ulp * sum |term|,
    however much the terms cancel: the atol scale of the rule for these gradients (the
    summation bound; conv weight gradients use the looser n * max|truth|)."""

    def __init__(self, model: nn.Module):
        self.scales: dict[str, float] = {}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in model.named_modules()
                        if type(m) is nn.BatchNorm2d]

    def _hook(self, name: str):
        def hook(bn, args, out):
            x = args[0].detach()
            if bn.training or bn.running_mean is None:
                mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
            else:
                mean, var = bn.running_mean, bn.running_var
            xhat = (x - mean.view(1, -1, 1, 1)) * torch.rsqrt(var.view(1, -1, 1, 1) + bn.eps)

            def record(dy):
                prefix = f"{name}." if name else ""
                self.scales[prefix + "weight"] = (dy * xhat).abs().sum((0, 2, 3)).max().item()
                self.scales[prefix + "bias"] = dy.abs().sum((0, 2, 3)).max().item()

            out.register_hook(record)

        return hook

    def __enter__(self) -> dict[str, float]:
        return self.scales

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


def step(model: nn.Module, x: torch.Tensor, grad_seed: int = 1):
    """Forward + backward with a fixed random output gradient; returns the output, the input
    gradient, the parameter gradients and (copies of) the buffers."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = model(x)
    g = torch.Generator().manual_seed(grad_seed)
    out.backward(torch.randn(out.shape, generator=g).to(device=out.device, dtype=out.dtype))
    params = {n: p.grad for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    return out.detach(), x.grad, params, buffers


def conv_terms(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """N·H·W of each conv's output: the number of products a conv weight gradient sums."""
    terms, handles = {}, []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            def hook(mod, inp, out, name=name):
                terms[f"{name}.weight"] = out.numel() // out.shape[1]

            handles.append(m.register_forward_hook(hook))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return terms


def check_rule(got, want, exact, dtype, terms, input_grad=True, param_grads=True, sums=None):
    """The tolerance rule on the results of `step` (fused, eager, float64); `sums` holds the
    atol scales of BatchNorm parameter gradients (`BatchNormSumScales`)."""
    assert_within_rule("output", got[0], want[0], exact[0], dtype)
    if input_grad:
        assert_within_rule("grad_input", got[1], want[1], exact[1], dtype)
    if param_grads:
        for name, value in exact[2].items():
            assert got[2][name] is not None, name
            # A conv weight gradient sums n = N·H·W products of the gradient the fused op
            # feeds it: a last-place difference per term may grow n-fold (as in test_modules).
            scale = terms[name] * max(1.0, value.abs().max().item()) if name in terms else None
            if sums and name in sums:
                scale = max(1.0, sums[name])
            assert_within_rule(name, got[2][name], want[2][name], value, torch.float32, scale)
    for name, value in exact[3].items():
        if name.endswith("num_batches_tracked"):
            assert torch.equal(got[3][name], value), name
        else:
            assert_within_rule(name, got[3][name], want[3][name], value, torch.float32)


def block_inputs(truth: nn.Module, x: torch.Tensor, training: bool) -> dict[str, torch.Tensor]:
    """The float64 input of every block (and of the stem) in a forward of a copy of `truth`."""
    probe = copy.deepcopy(truth).train(training)
    inputs, handles = {}, []
    for name, m in probe.named_modules():
        if isinstance(m, tv.models.resnet.BasicBlock | tv.models.resnet.Bottleneck) or name == "conv1":
            handles.append(m.register_forward_pre_hook(
                lambda mod, args, name=name: inputs.__setitem__(name, args[0].detach().clone())))
    with torch.no_grad():
        probe(x.double())
    return inputs


def stem(model: nn.Module) -> nn.Module:
    """The stem as a module of the model's own submodules (conv1, bn1, relu)."""
    return nn.Sequential(model.conv1, model.bn1, model.relu)


def check_blocks(fused, original, truth, x, training, dtype=torch.float32):
    """Each block of the real model on the input the float64 model gives it (see module doc)."""
    inputs = block_inputs(truth, x, training)
    checked = 0
    for name, x_in in inputs.items():
        parts = [stem(m) if name == "conv1" else m.get_submodule(name) for m in (fused, original, truth)]
        for m in parts:
            m.train(training)
        x32 = x_in.to(dtype)
        terms = conv_terms(parts[1], x32)
        got, want = step(parts[0], x32), step(parts[1], x32)
        with BatchNormSumScales(parts[2]) as sums:
            exact = step(parts[2], x32.double())
        check_rule(got, want, exact, dtype, terms, sums=sums)
        checked += 1
    return checked


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
    assert c.get("bn_apply") == 1 + blocks * bns_per_block - dual, c
    assert c.get("bn_stats") == 1 + blocks * bns_per_block + dual, c
    assert c.get("bn_backward_apply") == 1 + blocks * bns_per_block + dual, c
    assert not any("batch_norm" in k or k in ("relu", "relu_", "threshold_backward") for k in c), c


# --------------------------------------------------------------------------------------------
# Numerics: whole models and every block
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_resnet18_matches_original(backend, training):
    fused, original, truth = triple("resnet18", backend)
    x = torch.randn(2, 3, 64, 64, device=DEVICE)
    terms = conv_terms(original, x)
    for m in (fused, original, truth):
        m.train(training)
    for _ in range(2):  # the second step starts from updated running statistics
        got, want = step(fused, x), step(original, x)
        with BatchNormSumScales(truth) as sums:
            exact = step(truth, x.double())
        check_rule(got, want, exact, torch.float32, terms, sums=sums)
    assert check_blocks(fused, original, truth, x, training) == 9


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_resnet50_matches_original(backend, training):
    fused, original, truth = triple("resnet50", backend)
    x = torch.randn(2, 3, 64, 64, device=DEVICE)
    for m in (fused, original, truth):
        m.train(training)
    got, want, exact = step(fused, x), step(original, x), step(truth, x.double())
    # Whole model: outputs and running statistics, and the input gradient in eval mode; the
    # parameter gradients per block (see module doc).
    check_rule(got, want, exact, torch.float32, conv_terms(original, x), input_grad=not training,
               param_grads=False)
    assert check_blocks(fused, original, truth, x, training) == 17


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
        truth = copy.deepcopy(original).double()
        fused = fused_residual.convert(copy.deepcopy(original), backend=backend)
        x = torch.relu(torch.randn(shape, device=DEVICE))
        terms = conv_terms(original, x)
        for training in modes:
            for m in (fused, original, truth):
                m.train(training)
            check_rule(step(fused, x), step(original, x), step(truth, x.double()), torch.float32, terms)


@pytest.mark.parametrize("arch", ["resnext50_32x4d", "wide_resnet50_2"])
def test_other_resnets_convert_and_match(arch):
    """Construct, convert, a training and an eval forward of the whole model under the rule,
    and a training step of a downsampling and an identity block (grouped / wide convs)."""
    backend = FAST[0] if FAST else "reference"
    fused, original, truth = triple(arch, backend)
    assert sum(type(m).__name__ == "FusedBottleneck" for m in fused.modules()) == 16
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    for training in (True, False):
        for m in (fused, original, truth):
            m.train(training)
        with torch.no_grad():
            got, want, exact = fused(x), original(x), truth(x.double())
        assert_within_rule(f"{arch} output", got, want, exact, torch.float32)
    for name, shape in (("layer2.0", (2, 256, 8, 8)), ("layer2.1", (2, 512, 4, 4))):
        parts = [m.get_submodule(name).train() for m in (fused, original, truth)]
        x_in = torch.relu(torch.randn(shape, device=DEVICE))  # a block's input is a ReLU output
        check_rule(step(parts[0], x_in), step(parts[1], x_in), step(parts[2], x_in.double()),
                   torch.float32, conv_terms(parts[1], x_in))


@pytest.mark.parametrize("backend", FAST)
def test_channels_last(backend):
    """A channels_last model and input: the same values under the rule, and channels_last
    activations throughout (the fused ops keep the working layout)."""
    fused, original, truth = triple("resnet18", backend)
    for m in (fused, original, truth):
        m.to(memory_format=torch.channels_last).train()
    x = torch.randn(2, 3, 64, 64, device=DEVICE).contiguous(memory_format=torch.channels_last)
    layouts = []
    fused.layer2[0].register_forward_hook(lambda m, i, o: layouts.append(o.is_contiguous(
        memory_format=torch.channels_last)))
    fused.bn1.register_forward_hook(lambda m, i, o: layouts.append(o.is_contiguous(
        memory_format=torch.channels_last)))
    got, want, exact = step(fused, x), step(original, x), step(truth, x.double())
    check_rule(got, want, exact, torch.float32, conv_terms(original, x))
    assert layouts == [True, True]
    assert got[1].is_contiguous(memory_format=torch.channels_last)
    assert check_blocks(fused, original, truth, x, True) == 9


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", FAST)
def test_autocast(backend, dtype):
    """Autocast to bfloat16 / float16: convs run in the low dtype and so do the fused tails.

    The bound: under autocast the original model is itself far from the float64 truth (every
    conv input is rounded to the low dtype, 2^-8 or 2^-11 relative, and every eager BatchNorm
    output, add and ReLU is rounded again), while a fused tail rounds once. So the
    dtype-appropriate form of the rule is the rule itself with the low dtype's atol: the
    converted model's error against the float64 model at most 2x the autocast original's,
    plus one ulp of that dtype at the result's scale, for the output, the input gradient and
    the running statistics (float32 buffers from low-precision batches) of the whole model,
    and for the output, input gradient and parameter gradients of four blocks (parameter
    gradients are float32 sums of low-precision products: the low dtype's atol with the
    n-fold term count).
    """
    fused, original, truth = triple("resnet18", backend)
    x = torch.randn(2, 3, 64, 64, device=DEVICE)
    for m in (fused, original, truth):
        m.train()
    with torch.autocast(DEVICE, dtype=dtype):
        got, want = step(fused, x), step(original, x)
    exact = step(truth, x.double())
    assert got[0].dtype == want[0].dtype == dtype
    assert_within_rule("output", got[0], want[0], exact[0], dtype)
    assert_within_rule("grad_input", got[1], want[1], exact[1], dtype)
    for name, value in exact[3].items():
        if not name.endswith("num_batches_tracked"):
            assert_within_rule(name, got[3][name], want[3][name], value, dtype)
    # Per block, on the float64 model's block inputs rounded to the low dtype, under autocast.
    inputs = block_inputs(truth, x, True)
    for name in ("layer1.0", "layer2.0", "layer3.1", "layer4.0"):
        parts = [m.get_submodule(name).train() for m in (fused, original, truth)]
        x_in = inputs[name].to(dtype)
        with torch.autocast(DEVICE, dtype=dtype):
            b_got, b_want = step(parts[0], x_in), step(parts[1], x_in)
        b_exact = step(parts[2], x_in.double())
        assert_within_rule(f"{name} output", b_got[0], b_want[0], b_exact[0], dtype)
        assert_within_rule(f"{name} grad_input", b_got[1], b_want[1], b_exact[1], dtype)
        terms = conv_terms(parts[2], x_in.double())
        for pname, value in b_exact[2].items():
            scale = terms[pname] * max(1.0, value.abs().max().item()) if pname in terms else None
            assert_within_rule(f"{name}.{pname}", b_got[2][pname], b_want[2][pname], value, dtype,
                               scale)


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
        truth = copy.deepcopy(original).double()
        fused = fused_residual.convert(copy.deepcopy(original), backend=backend)
        check_rule(step(fused, x), step(original, x), step(truth, x.double()), torch.float32,
                   conv_terms(original, x))
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
