"""convert() by data flow (issue 20): models it fuses beyond torchvision's and timm's ResNets,
what convert() itself costs, and the converted forward's host overhead.

- densenet121 (121 BatchNorm → ReLU, folded into the layers' own forwards) and Hugging Face's
  ResNet-50 (`ResNetForImageClassification`, built from its default config: tails reached
  through `self.layer`) training steps, eager vs eager + convert, in the torchvision ResNet-50
  case's setting (test_model_bench: GPU batch 128, 224x224, bfloat16 autocast, channels_last;
  CPU batch 32, 64x64, float32, NCHW), through test_model_bench's `_bench_train_step`.
- convert() itself on resnet152 and densenet201: tracing every module that holds a
  BatchNorm, matching, code generation and the class swaps, on a fresh copy each round (the
  copy is not timed); the first call of the session (imports, code generation before its
  caches fill) is in extra_info. CPU time, whatever the device: the issue asks for well under
  a second on CPU.
- The converted forward's host overhead: three small torchvision BasicBlocks (6 fused
  patterns, one of them dual) at (2, 8, 4, 4) float32 on one thread, where the kernels do
  next to nothing, eval forward and training forward + backward, eager vs eager + convert;
  `patterns` in extra_info turns a call's time into time per fused pattern.
"""

from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from bench_common import DEVICE, device_name, record, time_case
from test_model_bench import BATCH, CASE, CHANNELS_LAST, DTYPE, IMAGE, _bench_train_step
from test_overhead_bench import one_thread  # noqa: F401 (a fixture)

import fused_residual
from fused_residual.bench_utils import synchronize

tv = pytest.importorskip("torchvision")

FMT = torch.channels_last if CHANNELS_LAST else torch.contiguous_format
STEP = {"batch": BATCH, "image": IMAGE, "dtype": str(DTYPE)}


def _inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 3, IMAGE, IMAGE, generator=g).to(DEVICE).contiguous(memory_format=FMT)
    return x, torch.randint(0, 1000, (BATCH,), generator=g).to(DEVICE)


def _loss_fn(logits_of):
    x, y = _inputs()

    def loss_fn(m):
        with torch.autocast(device_type=DEVICE, dtype=torch.bfloat16, enabled=DTYPE == torch.bfloat16):
            return F.cross_entropy(logits_of(m(x)), y)

    return loss_fn


@pytest.mark.parametrize("provider", ["eager", "eager+convert"])
def test_densenet121_train_step(benchmark, provider):
    torch.manual_seed(0)
    model = tv.models.densenet121(num_classes=1000).to(device=DEVICE, memory_format=FMT).train()
    _bench_train_step(benchmark, CASE.replace("resnet50", "densenet121", 1), provider, model,
                      _loss_fn(lambda out: out), dict(STEP))


@pytest.mark.parametrize("provider", ["eager", "eager+convert"])
def test_transformers_resnet50_train_step(benchmark, provider):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (test extra)")
    torch.manual_seed(0)
    model = transformers.ResNetForImageClassification(transformers.ResNetConfig(num_labels=1000))
    model = model.to(device=DEVICE, memory_format=FMT).train()
    _bench_train_step(benchmark, CASE.replace("resnet50", "transformers ResNet-50", 1), provider, model,
                      _loss_fn(lambda out: out.logits), dict(STEP))


@pytest.mark.parametrize("arch, norms", [("resnet152", 155), ("densenet201", 201)])
def test_convert_time(benchmark, arch, norms):
    """Seconds per convert() call on CPU (a fresh, unconverted copy each round)."""
    torch.manual_seed(0)
    model = getattr(tv.models, arch)()
    start = time.perf_counter()
    first = fused_residual.convert(copy.deepcopy(model))
    first_s = time.perf_counter() - start
    assert fused_residual.convert_report(first).fused_norms == norms  # every BatchNorm fused
    case = f"convert() of {arch} ({norms} BatchNorm2d, CPU)"
    benchmark.group = case
    benchmark.pedantic(fused_residual.convert, setup=lambda: ((copy.deepcopy(model),), {}), rounds=10,
                       warmup_rounds=0, iterations=1)
    record(case, "convert", benchmark, {"first_call_s": round(first_s, 3), "device": "cpu"})


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("provider", ["eager", "eager+convert"])
@pytest.mark.parametrize("mode", ["eval_fwd", "train_fwdbwd"])
def test_converted_forward_host_overhead(benchmark, mode, provider):
    from torchvision.models.resnet import BasicBlock

    torch.manual_seed(0)
    shortcut = nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))
    model = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 16, 2, shortcut), BasicBlock(16, 16)).to(DEVICE)
    if provider == "eager+convert":
        fused_residual.convert(model)
        assert fused_residual.convert_report(model).fused == 6
    train = mode == "train_fwdbwd"
    model.train(train)
    x = torch.randn(2, 8, 4, 4, device=DEVICE, requires_grad=train)
    grad = torch.randn(2, 16, 2, 2, device=DEVICE)

    def run():
        if train:
            model(x).backward(grad)
        else:
            with torch.no_grad():
                model(x)

    case = f"converted forward host overhead: 3 BasicBlocks (6 patterns) 2x8x4x4 float32 {mode} (1 thread)"
    benchmark.group = case
    extra = time_case(benchmark, run, iterations=100)
    synchronize(DEVICE)
    record(case, provider, benchmark, {**extra, "patterns": 6, "device": device_name()})
