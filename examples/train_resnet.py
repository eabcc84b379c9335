"""Train a torchvision ResNet converted by `fused_residual.convert` next to the unconverted one.

Both models start from the same weights and see the same synthetic batches (class
prototypes plus noise: learnable, so the loss falls), one SGD step each per batch. Prints a
progress bar, each model's throughput (images/s over the timed steps) and loss, and checks
that the two loss curves agree:

* the first step's losses (identical weights, identical batch) to `--first-rtol`;
* over the whole run, as curves: the moving averages (window `--window`) within
  `--curve-rtol` of each other. Training is chaotic: within a few steps two float32 runs
  that differ only in rounding follow different trajectories (in float64 the two models'
  losses agree to ~1e-15 for as long as one cares to run them), so later single losses are
  not comparable, but their averages are.

Exits 1 when a check fails. Defaults (resnet18, 32x32 images, batch 32, 300 steps) take a
few minutes on a 2-core CPU:

    python examples/train_resnet.py
    python examples/train_resnet.py --device cuda --arch resnet50 --image-size 64 --batch-size 128 \\
        --channels-last --bf16
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch
import torch.nn.functional as F
import torchvision

import fused_residual


class Progress:
    """A one-line text progress bar (no dependency): `[####......] step/total extra`."""

    def __init__(self, total: int, width: int = 30, stream=sys.stderr) -> None:
        self.total, self.width, self.stream = total, width, stream
        self.start = time.perf_counter()

    def update(self, done: int, extra: str = "") -> None:
        filled = self.width * done // self.total
        elapsed = time.perf_counter() - self.start
        eta = elapsed / done * (self.total - done) if done else 0.0
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(f"\r[{bar}] {done}/{self.total} {extra} eta {eta:4.0f}s ")
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


class SyntheticData:
    """Batches of noisy class prototypes: each prototype is a smooth random image (a 4x4
    pattern upsampled) of amplitude `signal` under unit Gaussian pixel noise, and a fraction
    `label_noise` of the labels is replaced by a random class. The loss cannot reach 0 (its
    floor is the entropy of the label noise, ~1.2 nats for 10 classes and 0.3), so the two
    models' curves stay comparable as relative numbers over the whole run."""

    def __init__(self, classes: int, image_size: int, batch_size: int, seed: int, device: str,
                 signal: float = 0.2, label_noise: float = 0.3) -> None:
        self.g = torch.Generator().manual_seed(seed)
        coarse = torch.randn(classes, 3, 4, 4, generator=self.g)
        self.prototypes = signal * F.interpolate(coarse, size=(image_size, image_size), mode="bilinear",
                                                 align_corners=False)
        self.batch_size, self.device, self.classes = batch_size, device, classes
        self.label_noise = label_noise

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, self.classes, (self.batch_size,), generator=self.g)
        x = self.prototypes[y] + torch.randn(self.batch_size, *self.prototypes.shape[1:], generator=self.g)
        flip = torch.rand(self.batch_size, generator=self.g) < self.label_noise
        y = torch.where(flip, torch.randint(0, self.classes, (self.batch_size,), generator=self.g), y)
        return x.to(self.device), y.to(self.device)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def moving_average(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet18", help="a torchvision ResNet (resnet18..152, resnext, wide)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="auto", help="fused_residual backend for the converted model")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=3, help="untimed first steps (allocator, caches)")
    p.add_argument("--first-rtol", type=float, default=None,
                   help="default 1e-4, or 3e-2 with --bf16 (bfloat16 convs round to 2^-8)")
    p.add_argument("--window", type=int, default=50)
    p.add_argument("--curve-rtol", type=float, default=0.15)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.first_rtol is None:
        args.first_rtol = 3e-2 if args.bf16 else 1e-4
    if args.steps <= args.warmup:
        raise SystemExit(f"--steps must exceed --warmup ({args.warmup})")
    torch.manual_seed(args.seed)
    eager = getattr(torchvision.models, args.arch)(num_classes=args.classes)
    fused = fused_residual.convert(copy.deepcopy(eager), backend=args.backend)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    models = {"eager": eager, "fused": fused}
    optims = {}
    for name, m in models.items():
        m.to(device=args.device, memory_format=fmt).train()
        optims[name] = torch.optim.SGD(m.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    data = SyntheticData(args.classes, args.image_size, args.batch_size, args.seed + 1, args.device)

    def train_step(name: str, x: torch.Tensor, y: torch.Tensor) -> float:
        optims[name].zero_grad(set_to_none=True)
        with torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.bf16):
            loss = F.cross_entropy(models[name](x), y)
        loss.backward()
        optims[name].step()
        return loss.detach()

    print(f"{args.arch} on {args.device} ({torch.get_num_threads()} threads), batch {args.batch_size}, "
          f"{args.image_size}x{args.image_size}, {'bf16 autocast' if args.bf16 else 'float32'}"
          f"{', channels_last' if args.channels_last else ''}, {args.steps} steps, backend "
          f"{args.backend!r} (available here: {fused_residual.available_backends(args.device)})")
    losses: dict[str, list[torch.Tensor]] = {"eager": [], "fused": []}
    seconds = {"eager": 0.0, "fused": 0.0}
    bar = Progress(args.steps)
    for step in range(args.steps):
        x, y = data.batch()
        x = x.contiguous(memory_format=fmt)
        # Alternate which model goes first, so neither always runs on a warmer cache.
        for name in (("fused", "eager") if step % 2 else ("eager", "fused")):
            synchronize(args.device)
            start = time.perf_counter()
            losses[name].append(train_step(name, x, y))
            synchronize(args.device)
            if step >= args.warmup:
                seconds[name] += time.perf_counter() - start
        if step % 10 == 0 or step == args.steps - 1:
            timed = max(1, step + 1 - args.warmup) * args.batch_size
            bar.update(step + 1, f"loss eager {losses['eager'][-1].item():.3f} fused "
                                 f"{losses['fused'][-1].item():.3f} | img/s eager "
                                 f"{timed / max(seconds['eager'], 1e-9):.0f} fused "
                                 f"{timed / max(seconds['fused'], 1e-9):.0f}")
    bar.close()

    curves = {k: [v.item() for v in vs] for k, vs in losses.items()}
    images = (args.steps - args.warmup) * args.batch_size
    speed = {k: images / s for k, s in seconds.items()}
    print(f"throughput (images/s): eager {speed['eager']:.1f}, converted {speed['fused']:.1f} "
          f"({speed['fused'] / speed['eager']:.2f}x)")
    print(f"ms per step: eager {1e3 * seconds['eager'] / (args.steps - args.warmup):.1f}, converted "
          f"{1e3 * seconds['fused'] / (args.steps - args.warmup):.1f}")
    for k in (0, args.steps // 4, args.steps // 2, 3 * args.steps // 4, args.steps - 1):
        print(f"  step {k:5d}: loss eager {curves['eager'][k]:.4f}  converted {curves['fused'][k]:.4f}")

    first = abs(curves["fused"][0] - curves["eager"][0]) / max(abs(curves["eager"][0]), 1e-6)
    avg = {k: moving_average(v, args.window) for k, v in curves.items()}
    curve = max(abs(a - b) / max(abs(b), 1e-6) for a, b in zip(avg["fused"], avg["eager"], strict=True))
    ok_first, ok_curve = first <= args.first_rtol, curve <= args.curve_rtol
    print(f"first step: relative loss difference {first:.2e} (tolerance {args.first_rtol:g}) "
          f"{'ok' if ok_first else 'FAIL'}")
    print(f"moving averages over {args.window} steps: max relative difference {curve:.3f} "
          f"(tolerance {args.curve_rtol:g}) {'ok' if ok_curve else 'FAIL'}")
    print(f"average loss of the last {args.window} steps: eager {avg['eager'][-1]:.4f}, converted "
          f"{avg['fused'][-1]:.4f} (first step {curves['eager'][0]:.4f})")
    return 0 if ok_first and ok_curve else 1


if __name__ == "__main__":
    sys.exit(main())
