"""A whole torchvision ResNet-50 training step (forward, backward, SGD step) for eager PyTorch,
eager + `fused_residual.convert`, torch.compile, and torch.compile + convert.

GPU: batch 128, 3x224x224, bfloat16 autocast, channels_last (the issue's H100 setting).
CPU: batch 32, float32, NCHW, and 3x64x64 images instead of 224x224, so that a step takes
a fraction of a second on a few cores; the case name says which.

Recorded per provider (bench_common.record, in each result's extra_info): median ms per
step, images/s, and memory. GPU: `torch.cuda.max_memory_allocated` over the timed steps
(peak_MB: parameters, gradients, optimizer state, activations, workspaces). CPU has no
allocator peak to read, so the proxy is the bytes autograd saves for the backward during
one forward (saved_MB, distinct storages: the activation memory that fusion changes), for
the eager providers; under torch.compile the saved tensors live inside the compiled graph
and are not measured.

`pytest benchmarks/ --benchmark-disable` runs each case once (compiling included: about half
a minute per torch.compile provider on a 2-core CPU).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from bench_common import DEVICE, compile_baseline, device_name, record, time_case

import fused_residual
from fused_residual.bench_utils import synchronize

tv = pytest.importorskip("torchvision")

if DEVICE == "cuda":
    BATCH, IMAGE, DTYPE, CHANNELS_LAST = 128, 224, torch.bfloat16, True
    CASE = "resnet50 train step 128x3x224x224 bf16-autocast channels_last"
else:
    BATCH, IMAGE, DTYPE, CHANNELS_LAST = 32, 64, torch.float32, False
    CASE = "resnet50 train step 32x3x64x64 float32 (CPU: 64x64 images)"

PROVIDERS = ["eager", "eager+convert", "compile", "compile+convert"]


def _saved_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for the backward during one forward."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(storages.values())


@pytest.mark.parametrize("provider", PROVIDERS)
def test_resnet50_train_step(benchmark, provider):
    torch.manual_seed(0)
    model = tv.models.resnet50(num_classes=1000)
    if provider.endswith("+convert"):
        fused_residual.convert(model)
    fmt = torch.channels_last if CHANNELS_LAST else torch.contiguous_format
    model = model.to(device=DEVICE, memory_format=fmt).train()
    compiled = provider.startswith("compile")
    net = compile_baseline(model) if compiled else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 3, IMAGE, IMAGE, generator=g).to(DEVICE).contiguous(memory_format=fmt)
    y = torch.randint(0, 1000, (BATCH,), generator=g).to(DEVICE)
    autocast = dict(device_type=DEVICE, dtype=torch.bfloat16, enabled=DTYPE == torch.bfloat16)

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(**autocast):
            loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        synchronize(DEVICE)
        return loss

    benchmark.group = CASE
    # Warm-up compiles the compile providers and fills caches and the optimizer state; peak
    # memory is read over the timed steps only.
    extra = time_case(benchmark, step, compiled=compiled,
                      before_timing=torch.cuda.reset_peak_memory_stats if DEVICE == "cuda" else None)
    loss = step()
    assert torch.isfinite(loss), loss
    extra.update(device=device_name(), batch=BATCH, image=IMAGE, dtype=str(DTYPE))
    if DEVICE == "cuda":
        extra["peak_MB"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    elif not provider.startswith("compile"):
        with torch.autocast(**autocast):
            extra["saved_MB"] = round(_saved_bytes(model, x) / 2**20, 1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        extra["images_per_s"] = round(BATCH / stats.stats.median, 1)
    record(CASE, provider, benchmark, extra)


def test_converted_model_saves_no_more_for_backward():
    """Not timed: the issue's memory target (no more than eager), in the bytes saved for the
    backward. Eager torchvision saves two activations per conv + BatchNorm + ReLU (the conv
    output for the BatchNorm, the in-place ReLU's output for itself and the next conv); a
    fused unit saves the same two plus a 1-bit mask: at most 1/32 more in float32."""
    torch.manual_seed(0)
    model = tv.models.resnet50(num_classes=10).to(DEVICE).train()
    fused = fused_residual.convert(copy.deepcopy(model))
    x = torch.randn(2, 3, 64, 64, device=DEVICE)
    before, after = _saved_bytes(model, x), _saved_bytes(fused, x)
    assert after <= before * (1 + 1 / 32), (before, after)
