"""Mutation check of the numerics tests: break one behaviour in a copy of the code, run a test
selection there, and report whether the tests caught it (issue 24). A numerics suite whose
bounds are too loose, or whose baselines move, lets a mutation pass.

    python scripts/mutation_check.py                     # every mutation, the default selection
    python scripts/mutation_check.py --only residual_dropped -- tests/test_functional.py -k extension

Each mutation is a textual edit of one file of fused_residual/ (the op composition every fused
backend shares, fused_residual/autograd.py, so no rebuild is needed: the copy takes this
tree's built extension). The copy is the tracked and untracked (not ignored) files plus the
built extension, in a temporary directory; this tree is never changed. Prints one line per
mutation (caught / NOT caught, and the first failing tests); exits 1 if any mutation was not
caught or any edit no longer applies (the code moved: update the mutation).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str
    path: str
    old: str
    new: str
    selection: tuple[str, ...] = ()  # its own pytest selection (default: the command line's)


MUTATIONS = [
    Mutation(
        "biased_running_var",
        "the running variance is updated with the biased batch variance (no n/(n-1))",
        "fused_residual/autograd.py",
        "mean, var, values_per_channel(input), running_mean, running_var, momentum",
        "mean, var * (values_per_channel(input) - 1) / values_per_channel(input), values_per_channel(input), "
        "running_mean, running_var, momentum",
    ),
    Mutation(
        "eps_for_eps2",
        "the dual op normalizes its second input with the first BatchNorm's eps",
        "fused_residual/autograd.py",
        "bn.eps, bn2.eps, save_mask)",
        "bn.eps, bn.eps, save_mask)",
    ),
    Mutation(
        "residual_dropped",
        "the single-BatchNorm op ignores its residual",
        "fused_residual/autograd.py",
        # every path of FusedBatchNormAddReLU.forward (eval apply, the composite training
        # forward, the primitives under torch.compile)
        "        ops = backend_ops(ops_name)\n        composite = use_composites()\n",
        "        ops = backend_ops(ops_name)\n        composite = use_composites()\n"
        "        residual = None\n",
    ),
    Mutation(
        "mask_ignored",
        "the backward ignores the ReLU mask (every bit set)",
        "fused_residual/autograd.py",
        "    if composite:\n        grads = ops.backward(",
        "    mask = torch.full_like(mask, 255)\n    if composite:\n        grads = ops.backward(",
    ),
    Mutation(
        "eval_batch_stats",
        "evaluation mode normalizes with the batch statistics instead of the running ones",
        "fused_residual/autograd.py",
        # the single-BatchNorm forward's eval path (the dual forward's is batch_statistics)
        "out, mask = ops.apply(input, residual, running_mean, running_var, weight, bias, eps, True)",
        "out, mask = ops.apply(input, residual, *ops.stats(input), weight, bias, eps, True)",
    ),
]

# Kernel mutations of the Triton backend (pure Python, no rebuild), each with the converted-model
# test of interpreted Triton blocks as its selection: what FusedOpAudit (tests/model_checks.py)
# catches inside a model, where the op-by-op tests are not run.
KERNEL_MUTATIONS = [
    Mutation(
        "triton_kernel_residual_dropped",
        "the Triton apply kernel ignores its residual",
        "fused_residual/triton/apply.py",
        "        y = y + load_acc(r_ptr, offs, valid, IS_F64)\n",
        "        y = y + 0.0 * load_acc(r_ptr, offs, valid, IS_F64)\n",
        ("tests/test_convert.py", "-k", "interpreted_triton"),
    ),
    Mutation(
        "triton_kernel_biased_running_var",
        "the Triton running-statistics kernel updates with the biased variance",
        "fused_residual/triton/stats.py",
        "*split_f64(count / (count - 1))",
        "*split_f64(1.0)",
        ("tests/test_convert.py", "-k", "interpreted_triton"),
    ),
]

DEFAULT_SELECTION = ["tests/test_functional.py", "tests/test_dual.py", "tests/test_ops.py",
                     "tests/test_bn_parity.py", "tests/test_modules.py", "-k", "not triton"]


def copy_tree(dest: Path) -> None:
    """The tracked and untracked (not ignored) files, and the built extension."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, check=True, capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    for built in [*(REPO / "fused_residual").glob("_C*.so"), REPO / "fused_residual" / "_build_info.py"]:
        if built.exists():
            shutil.copy2(built, dest / "fused_residual" / built.name)


def run_selection(tree: Path, selection: list[str]) -> tuple[int, list[str]]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *selection]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, env=env)
    failed = [line.split(" ", 1)[1].split(" - ")[0] for line in done.stdout.splitlines()
              if line.startswith("FAILED ")]
    return done.returncode, failed or done.stdout.splitlines()[-3:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", action="append", help="a mutation name (repeatable); default: all")
    p.add_argument("--kernels", action="store_true",
                   help="also the Triton kernel mutations, each with its own selection (slow: interpreted)")
    p.add_argument("--list", action="store_true", help="list the mutations and exit")
    p.add_argument("selection", nargs="*", help="pytest arguments (after --); default: %(default)s",
                   default=DEFAULT_SELECTION)
    args = p.parse_args(argv)
    if args.list:
        for m in MUTATIONS + KERNEL_MUTATIONS:
            print(f"{m.name}: {m.what} ({m.path})")
        return 0
    candidates = MUTATIONS + (KERNEL_MUTATIONS if args.kernels or args.only else [])
    chosen = [m for m in candidates if not args.only or m.name in args.only]
    selections = list(dict.fromkeys(tuple(m.selection or args.selection) for m in chosen))
    bad = 0
    with tempfile.TemporaryDirectory(prefix="fused_residual_mutation_") as tmp:
        base = Path(tmp) / "tree"
        base.mkdir()
        copy_tree(base)
        for selection in selections:
            code, failed = run_selection(base, list(selection))
            if code != 0:
                print(f"unmutated copy: pytest {' '.join(selection)} fails ({failed[:5]}): fix that first")
                return 1
            print(f"unmutated copy: pytest {' '.join(selection)} passes", flush=True)
        for m in chosen:
            target = base / m.path
            original = target.read_text()
            if original.count(m.old) != 1:
                print(f"{m.name}: EDIT DOES NOT APPLY ({m.path} changed): update the mutation")
                bad += 1
                continue
            target.write_text(original.replace(m.old, m.new))
            try:
                code, failed = run_selection(base, list(m.selection) or args.selection)
            finally:
                target.write_text(original)
            caught = code != 0 and any("::" in f for f in failed)
            bad += not caught
            shown = ", ".join(failed[:4]) + (f" (+{len(failed) - 4} more)" if len(failed) > 4 else "")
            print(f"{m.name}: {'caught' if caught else 'NOT caught'} ({m.what}): "
                  f"{len(failed) if caught else 0} failing: {shown}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
