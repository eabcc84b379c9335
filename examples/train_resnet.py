"""Train a torchvision ResNet converted by `fused_residual.convert` next to the unconverted one.

Both models start from the same weights and see the same synthetic batches (class
prototypes plus noise: learnable, so the loss falls), one SGD step each per batch. Prints a
progress bar, each model's throughput (images/s over the timed steps) and loss, and checks:

* the first step against a float64 run of it (same weights, same batch, no autocast): the
  converted model's logits may be off from float64 by at most 2x the eager model's largest
  logit error plus one unit in the last place of the compute dtype (the numerics contract's
  rule over many values, docs/op_layer.md), and its loss by the bound that follows from
  that through the loss's own computation (`loss_bound`: one scalar's error is a single
  draw, which 2x eager's passes or fails by CPU); both models' errors are printed, so a
  bfloat16 run shows which one is the more accurate;
* over the whole run, as curves: the moving averages (window `--window`, at most the number
  of steps) within `--curve-rtol` of each other. Training is chaotic: within a few steps two
  float32 runs that differ only in rounding follow different trajectories, so later single
  losses are not comparable, but their averages are.

With `--sync`, under `torchrun`, both models train with synchronized BatchNorm under
DistributedDataParallel: each rank takes its shard of every batch (`--batch-size` is the
whole batch), the converted model is synchronized by `fused_residual.convert_sync_batchnorm`,
the eager one by `nn.SyncBatchNorm` (on CPU, which nn.SyncBatchNorm refuses, by PyTorch's
SyncBatchNorm algorithm in eager ops: fused_residual's backend "reference"); gloo on CPU,
NCCL on GPUs (one per rank). The float64 truth is the original model on the whole batch in
one process, which synchronized BatchNorm reproduces; the losses are averaged over the ranks
and rank 0 prints.

Exits 1 when a check fails, 2 on bad arguments. Defaults (resnet18, 32x32 images, batch 32,
300 steps) take a few minutes on a 2-core CPU:

    python examples/train_resnet.py
    python examples/train_resnet.py --device cuda --arch resnet50 --image-size 64 --batch-size 128 \\
        --channels-last --bf16
    torchrun --standalone --nproc-per-node 2 examples/train_resnet.py --sync
    torchrun --standalone --nproc-per-node 2 examples/train_resnet.py --sync --device cuda
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel as DDP

import fused_residual

# The torchvision ResNet constructors convert() handles (resnet, resnext, wide_resnet).
ARCHS = tuple(name for name in torchvision.models.resnet.__all__ if name[0].islower())
# Learning rate per architecture family when --lr is not given: SGD (momentum 0.9) on small
# batches of small images diverges at higher rates for the deeper Bottleneck networks.
DEFAULT_LR = {"resnet18": 0.01, "resnet34": 0.01}
BOTTLENECK_LR = 0.002


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
    d = " (default: %(default)s)"
    p.add_argument("--arch", default="resnet18", choices=ARCHS, metavar="ARCH",
                   help=f"torchvision ResNet: {', '.join(ARCHS)}{d}")
    p.add_argument("--steps", type=int, default=300, help="training steps (batches) per model" + d)
    p.add_argument("--batch-size", type=int, default=32, help="images per batch" + d)
    p.add_argument("--image-size", type=int, default=32, help="height and width of the images" + d)
    p.add_argument("--classes", type=int, default=10, help="number of classes of the synthetic data" + d)
    p.add_argument("--device", default="cpu", help="cpu or cuda" + d)
    p.add_argument("--backend", default="auto", choices=("auto", "extension", "triton", "reference"),
                   help="fused_residual backend of the converted model" + d)
    p.add_argument("--channels-last", action="store_true",
                   help="channels_last models and batches (default: NCHW)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (default: float32)")
    p.add_argument("--lr", type=float, default=None,
                   help="SGD learning rate, momentum 0.9, weight decay 1e-4 (default: "
                        f"{DEFAULT_LR['resnet18']} for resnet18 and resnet34, {BOTTLENECK_LR} for the "
                        f"deeper Bottleneck architectures, which diverge at higher rates here)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the data" + d)
    p.add_argument("--warmup", type=int, default=3,
                   help="first steps left out of the throughput (allocator, caches)" + d)
    p.add_argument("--window", type=int, default=50,
                   help="moving-average window of the curve check, at most --steps" + d)
    p.add_argument("--curve-rtol", type=float, default=0.15,
                   help="largest relative difference of the two moving averages" + d)
    p.add_argument("--sync", action="store_true",
                   help="synchronized BatchNorm and DDP, one process per rank, under torchrun "
                        "(default: one process)")
    args = p.parse_args(argv)
    if args.sync:
        world = int(os.environ.get("WORLD_SIZE", "0"))
        if world < 1 or "LOCAL_RANK" not in os.environ:
            p.error("--sync runs under torchrun, e.g. torchrun --standalone --nproc-per-node 2 "
                    "examples/train_resnet.py --sync")
        if args.batch_size % world:
            p.error(f"--batch-size ({args.batch_size}) must be a multiple of the number of ranks ({world})")
    if args.steps <= args.warmup:
        p.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    for name in ("batch_size", "image_size", "classes", "window"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.classes < 2:
        p.error("--classes must be at least 2")
    if args.lr is None:
        args.lr = DEFAULT_LR.get(args.arch, BOTTLENECK_LR)
    return args


def within_rule(name: str, errors: dict[str, float], ulp: float, scale: float,
                say=print) -> tuple[bool, float]:
    """The contract's rule on many values (the logits): converted error <= 2 x eager error +
    1 ulp x scale. Returns (ok, the bound)."""
    bound = 2 * errors["eager"] + ulp * scale
    return report_bound(name, errors, bound, "", say), bound


def report_bound(name: str, errors: dict[str, float], bound: float, how: str, say=print) -> bool:
    ok = errors["fused"] <= bound
    say(f"first step {name}: error against float64: eager {errors['eager']:.2e}, converted "
        f"{errors['fused']:.2e} (bound {bound:.2e}{how}) {'ok' if ok else 'FAIL'}")
    return ok


def loss_bound(logits: torch.Tensor, labels: torch.Tensor, logit_bound: float) -> float:
    """The bound of the mean cross-entropy's error, computed in float32 from logits each off
    by at most `logit_bound` (`logits`: the float64 truth): the loss sums, over the batch,
    log-softmax terms whose gradient is (softmax - onehot) / B, so to first order the logits'
    errors move it by at most sum |softmax - onehot| / B x logit_bound; its own float32
    roundings add a few units of |logsumexp| + |the label's logit| per term and gamma_B of
    the mean (Higham's summation bound)."""
    z = logits.detach().double()
    batch = z.shape[0]
    u = torch.finfo(torch.float32).eps / 2
    sensitivity = (z.softmax(dim=1) - F.one_hot(labels, z.shape[1]).double()).abs().sum().item() / batch
    lse = z.logsumexp(dim=1)
    picked = z.gather(1, labels.view(-1, 1)).squeeze(1)
    rounding = 8 * u * (lse.abs() + picked.abs()).mean().item()
    rounding += batch * u * (lse - picked).abs().mean().item()
    return sensitivity * logit_bound + rounding


def init_sync(args: argparse.Namespace) -> tuple[int, int]:
    """--sync: join the process group torchrun describes in the environment (NCCL with one GPU
    per rank for --device cuda, else gloo); returns (rank, world size)."""
    if torch.device(args.device).type == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        args.device = f"cuda:{torch.cuda.current_device()}"
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def synchronized(name: str, model: nn.Module, device: str) -> nn.Module:
    """--sync: `model` with synchronized BatchNorm under DDP (see the module docstring)."""
    device_ids = [torch.device(device).index] if device.startswith("cuda") else None
    if name == "eager" and device_ids is not None:
        return DDP(nn.SyncBatchNorm.convert_sync_batchnorm(model), device_ids=device_ids)
    if name == "eager":  # CPU: PyTorch's SyncBatchNorm algorithm, unfused (backend "reference")
        fused_residual.convert(model, backend="reference")
    # DDP refuses a CPU module that holds an nn.SyncBatchNorm (PyTorch's is GPU-only), and
    # convert_sync_batchnorm swaps classes in place: synchronize after wrapping.
    ddp = DDP(model, device_ids=device_ids)
    fused_residual.convert_sync_batchnorm(ddp)
    return ddp


def global_mean(value: torch.Tensor, sync: bool) -> torch.Tensor:
    """--sync: the mean over the ranks (equal shards: the whole batch's mean)."""
    if sync:
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank, world = init_sync(args) if args.sync else (0, 1)
    say = print if rank == 0 else (lambda *_, **__: None)
    torch.manual_seed(args.seed)
    eager = getattr(torchvision.models, args.arch)(num_classes=args.classes)
    # The float64 truth of the first step: the same weights and (whole) batch, no autocast.
    truth_model = copy.deepcopy(eager).double().to(args.device).train()
    fused = fused_residual.convert(copy.deepcopy(eager), backend=args.backend)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    models = {"eager": eager, "fused": fused}
    optims = {}
    for name, m in models.items():
        m.to(device=args.device, memory_format=fmt).train()
        if args.sync:
            models[name] = synchronized(name, m, args.device)
        optims[name] = torch.optim.SGD(m.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    data = SyntheticData(args.classes, args.image_size, args.batch_size, args.seed + 1, args.device)
    shard = slice(rank * args.batch_size // world, (rank + 1) * args.batch_size // world)

    def train_step(name: str, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        optims[name].zero_grad(set_to_none=True)
        with torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.bf16):
            logits = models[name](x)
            loss = F.cross_entropy(logits, y)
        loss.backward()
        optims[name].step()
        return global_mean(loss.detach(), args.sync), logits.detach()

    ranks = f", {world} ranks ({dist.get_backend()}), synchronized BatchNorm under DDP" if args.sync else ""
    say(f"{args.arch} on {args.device} ({torch.get_num_threads()} threads){ranks}, batch {args.batch_size}, "
        f"{args.image_size}x{args.image_size}, {'bf16 autocast' if args.bf16 else 'float32'}"
        f"{', channels_last' if args.channels_last else ''}, {args.steps} steps, lr {args.lr:g}, "
        f"backend {args.backend!r} (available here: {fused_residual.available_backends(args.device)})")
    losses: dict[str, list[torch.Tensor]] = {"eager": [], "fused": []}
    first_logits: dict[str, torch.Tensor] = {}
    seconds = {"eager": 0.0, "fused": 0.0}
    bar = Progress(args.steps) if rank == 0 else None
    for step in range(args.steps):
        x, y = data.batch()
        x = x.contiguous(memory_format=fmt)
        if step == 0:
            with torch.no_grad():
                truth_all = truth_model(x.double())  # (the whole batch, in one process)
            truth_loss = F.cross_entropy(truth_all, y).item()
            first_labels = y
            first_logits["truth"] = truth_all[shard]
            del truth_model
        x, y = x[shard], y[shard]
        # Alternate which model goes first, so neither always runs on a warmer cache.
        for name in (("fused", "eager") if step % 2 else ("eager", "fused")):
            synchronize(args.device)
            start = time.perf_counter()
            loss, logits = train_step(name, x, y)
            synchronize(args.device)
            losses[name].append(loss)
            if step >= args.warmup:
                seconds[name] += time.perf_counter() - start
            if step == 0:
                first_logits[name] = logits
        if bar is not None and (step % 10 == 0 or step == args.steps - 1):
            timed = (step + 1 - args.warmup) * args.batch_size
            speed = (f"img/s eager {timed / seconds['eager']:.0f} fused {timed / seconds['fused']:.0f}"
                     if timed > 0 else "img/s after warmup")
            bar.update(step + 1, f"loss eager {losses['eager'][-1].item():.3f} fused "
                                 f"{losses['fused'][-1].item():.3f} | {speed}")
    if bar is not None:
        bar.close()

    curves = {k: [v.item() for v in vs] for k, vs in losses.items()}
    timed_steps = args.steps - args.warmup
    speed = {k: timed_steps * args.batch_size / s for k, s in seconds.items()}
    say(f"throughput over the last {timed_steps} steps (images/s{', all ranks' if args.sync else ''}): "
        f"eager {speed['eager']:.1f}, converted {speed['fused']:.1f} "
        f"({speed['fused'] / speed['eager']:.2f}x)")
    say(f"ms per step: eager {1e3 * seconds['eager'] / timed_steps:.1f}, converted "
        f"{1e3 * seconds['fused'] / timed_steps:.1f}")
    for k in sorted({0, args.steps // 4, args.steps // 2, 3 * args.steps // 4, args.steps - 1}):
        say(f"  step {k:5d}: loss eager {curves['eager'][k]:.4f}  converted {curves['fused'][k]:.4f}")

    ulp = torch.finfo(torch.bfloat16 if args.bf16 else torch.float32).eps
    # The logits of this rank's shard; with --sync the largest error over the ranks, so that
    # every rank reaches the same verdict.
    logit_err = torch.tensor([(first_logits[k].double() - first_logits["truth"]).abs().max().item()
                              for k in models], dtype=torch.float64, device=args.device)
    if args.sync:
        dist.all_reduce(logit_err, op=dist.ReduceOp.MAX)
    logit_err = dict(zip(models, logit_err.tolist(), strict=True))
    loss_err = {k: abs(curves[k][0] - truth_loss) for k in models}
    ok_first, logit_bound = within_rule("logits", logit_err, ulp, max(1.0, truth_all.abs().max().item()), say)
    ok_first &= report_bound("loss", loss_err, loss_bound(truth_all, first_labels, logit_bound),
                             ", the logits' bound through the loss", say)

    window = min(args.window, args.steps)
    avg = {k: moving_average(v, window) for k, v in curves.items()}
    curve = max(abs(a - b) / max(abs(b), 1e-6) for a, b in zip(avg["fused"], avg["eager"], strict=True))
    ok_curve = curve <= args.curve_rtol
    say(f"moving averages over {window} steps: max relative difference {curve:.3f} "
        f"(tolerance {args.curve_rtol:g}) {'ok' if ok_curve else 'FAIL'}")
    say(f"average loss of the last {window} steps: eager {avg['eager'][-1]:.4f}, converted "
        f"{avg['fused'][-1]:.4f} (first step {curves['eager'][0]:.4f}, float64 {truth_loss:.4f})")
    if args.sync:
        dist.destroy_process_group()
    return 0 if ok_first and ok_curve else 1

if __name__ == "__main__":
    sys.exit(main())
