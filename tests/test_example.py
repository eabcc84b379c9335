"""examples/train_resnet.py runs end to end (briefly, on CPU) and its arguments are checked."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from helpers import EXAMPLE_CLASSES

import fused_residual

pytest.importorskip("torchvision")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "train_resnet.py"


def load_example():
    spec = importlib.util.spec_from_file_location("train_resnet", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_runs_briefly_and_judges_both_models_against_float64(capsys):
    """Three steps at tiny sizes: the example's own checks pass (the logits under the
    contract's rule over many values, 2048 at EXAMPLE_CLASSES classes, the loss under the bound
    that follows from it through the loss), and every fused op the converted model runs meets
    its derived bound on its own arguments (tests/model_checks.py), whatever the CPU's rounding
    luck in the scalars."""
    pytest.importorskip("torchvision")
    from model_checks import FusedOpAudit

    example = load_example()
    with FusedOpAudit() as audit:
        code = example.main(["--steps", "3", "--warmup", "1", "--batch-size", "4", "--image-size", "16",
                             "--window", "50", "--device", "cpu", "--classes", str(EXAMPLE_CLASSES)])
    out = capsys.readouterr().out
    assert code == 0, out
    if "extension" in fused_residual.available_backends("cpu"):  # what backend "auto" runs
        # resnet18, three steps: one apply op per norm but the 3 shortcut norms in dual ops.
        assert (audit.calls["apply"], audit.calls["dual_apply"]) == (3 * 14, 3 * 3), audit.calls
    assert "first step logits: error against float64: eager " in out
    assert "first step loss: error against float64: eager " in out
    assert "the logits' bound through the loss" in out
    # Fewer steps than --window: the message names the window actually used.
    assert "moving averages over 3 steps" in out and "over 50 steps" not in out
    assert "throughput over the last 2 steps (images/s)" in out


def test_arch_is_validated_with_the_valid_names(capsys):
    example = load_example()
    with pytest.raises(SystemExit) as exc:
        example.parse_args(["--arch", "resnext"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'resnext'" in err and "'resnext50_32x4d'" in err and "'resnet18'" in err


@pytest.mark.parametrize("args, message", [
    (["--steps", "2", "--warmup", "3"], "--steps (2) must exceed --warmup (3)"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
])
def test_bad_numbers_are_usage_errors(capsys, args, message):
    with pytest.raises(SystemExit):
        load_example().parse_args(args)
    assert message in capsys.readouterr().err


def test_every_option_has_help_and_a_default(capsys):
    example = load_example()
    with pytest.raises(SystemExit):
        example.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for option in ("--arch", "--steps", "--batch-size", "--image-size", "--classes", "--device",
                   "--backend", "--lr", "--seed", "--warmup", "--window", "--curve-rtol"):
        assert option in out
    assert out.count("(default:") >= 13, out


def test_default_learning_rate_per_family():
    example = load_example()
    assert example.parse_args([]).lr == 0.01
    assert example.parse_args(["--arch", "resnet50"]).lr == example.BOTTLENECK_LR
    assert example.parse_args(["--arch", "resnet50", "--lr", "0.1"]).lr == 0.1
