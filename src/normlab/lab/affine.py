"""affine: BatchNorm with and without its learnable scale γ and shift β.

`ModelConfig` has no switch for γ/β, so the runs without them remove the parameters from the built model
(`drop_affine`, which sends them through the reference training loop). Both variants are the lesson's BatchNorm
MLP (momentum 0.1 so that short runs have settled running statistics), trained on the same seeds; val losses use
calibrated population statistics. The representation check sets γ = √(σ²_B + ε) and β = μ_B on a trained layer
and compares its train-mode output on a batch with its input, in float64.

Budget (the runs without γ/β take the reference loop): tiny 2 x 2 runs x 300 steps; quick 2 x 3 runs x 3,000 steps
(about 10 s on 2 cores); full 2 x 5 runs x 3,000 steps
(quiet 2-core time: the README's lab table).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from normlab.config import get_preset
from normlab.lab.common import (
    Check,
    Experiment,
    LabData,
    Verdict,
    markdown_table,
    number,
    train_config,
    training_batch,
)
from normlab.model import LanguageModel
from normlab.sweeps.runner import SweepRun, run_sweep
from normlab.training import batchnorm_layers, calibrate_batchnorm, evaluate

IDENTITY_TOLERANCE = 1e-9  # max |BN(h) - h| / max |h| with γ = σ_B, β = μ_B, in float64

CLAIM = ("BatchNorm with γ/β can represent the identity (with γ = √(σ²_B + ε) and β = μ_B its output equals its "
         f"input within {IDENTITY_TOLERANCE:g} relative, in float64), and this freedom pays: over seeds (each seed "
         "gives both variants the same initial weights and batches), the mean paired difference of final val loss "
         "(with γ/β minus without, calibrated statistics) is negative by more than its standard error.")


@dataclass(frozen=True)
class Settings:
    """Steps per run, seeds per variant, and the training examples the statistics are calibrated on (None: all)."""

    steps: int
    seeds: int
    calibration_examples: int | None


SETTINGS = {"tiny": Settings(300, 2, 20_000), "quick": Settings(3_000, 3, None), "full": Settings(3_000, 5, None)}
FINAL_EXAMPLES = 1_000  # the sweep's final losses are not used here: the val losses use calibrated statistics


def budget(settings: Settings) -> str:
    """Runs x steps."""
    return f"2 variants x {settings.seeds} seeds = {2 * settings.seeds} runs x {settings.steps:,} steps"


def drop_affine(model: LanguageModel) -> None:
    """Remove γ and β from every BatchNorm of `model` (as `affine=False` would have built it)."""
    for _, norm in batchnorm_layers(model):
        norm.weight, norm.bias, norm.affine = None, None, False


def identity_error(model: torch.nn.Module, x: torch.Tensor) -> float:
    """max |BN(h) - h| / max |h| for the first BatchNorm's input h on `x`, with γ and β set to the batch's std and
    mean, in float64 (on a copy of `model`)."""
    model = copy.deepcopy(model).double().train()
    _, norm = batchnorm_layers(model)[0]
    seen = []
    handle = norm.register_forward_hook(lambda _module, inputs, output: seen.append((inputs[0], output)))
    with torch.no_grad():
        model(x)
        h = seen[-1][0]
        norm.weight.copy_((h.var(0, unbiased=False) + norm.eps).sqrt())
        norm.bias.copy_(h.mean(0))
        model(x)
    handle.remove()
    h, output = seen[-1]
    return float((output - h).abs().max() / h.abs().max())


def measure(settings: Settings, data: LabData, progress: bool) -> dict[str, Any]:
    """Train both variants on every seed; calibrated val losses, γ/β statistics, the identity error."""
    model = replace(get_preset("lesson-batchnorm").model, bn_momentum=0.1)
    runs = [SweepRun(f"{variant} seed {seed}", model, train_config(settings.steps, seed=seed),
                     prepare=None if variant == "affine" else drop_affine)
            for variant in ("affine", "plain") for seed in range(settings.seeds)]
    results = run_sweep(runs, data.splits, len(data.vocab), progress=progress, keep_models=True,
                        final_examples=FINAL_EXAMPLES)
    x_calibration = (data.splits.train[0] if settings.calibration_examples is None
                     else training_batch(data, settings.calibration_examples)[0])
    losses: dict[str, list[float]] = {"affine": [], "plain": []}
    for run, result in zip(runs, results):
        calibrate_batchnorm(result.model, x_calibration)
        losses["affine" if run.prepare is None else "plain"].append(evaluate(result.model, *data.splits.val))
    norms = [batchnorm_layers(r.model)[0][1] for r, run in zip(results, runs) if run.prepare is None]
    x, _ = training_batch(data, 256)
    return {"settings": asdict(settings), "val_loss": losses,
            "gamma_mean_abs_deviation": [float((n.weight.detach() - 1).abs().mean()) for n in norms],
            "beta_mean_abs": [float(n.bias.detach().abs().mean()) for n in norms],
            "gamma": norms[0].weight.detach().tolist(), "beta": norms[0].bias.detach().tolist(),
            "identity_error": identity_error(results[0].model, x)}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def paired_difference(measurements: dict[str, Any]) -> tuple[float, float]:
    """Mean and standard error of the per-seed difference of val loss, with γ/β minus without (NaN: diverged)."""
    differences = [a - b for a, b in zip(measurements["val_loss"]["affine"], measurements["val_loss"]["plain"])]
    mean = _mean(differences)
    if len(differences) < 2:
        return mean, math.inf
    variance = sum((d - mean) ** 2 for d in differences) / (len(differences) - 1)
    return mean, math.sqrt(variance / len(differences))


def check(measurements: dict[str, Any]) -> Verdict:
    """Apply the rule of `CLAIM`."""
    error = measurements["identity_error"]
    mean, standard_error = paired_difference(measurements)
    return Verdict((
        Check("γ/β can represent the identity", error <= IDENTITY_TOLERANCE, f"relative error {error:.2e}"),
        Check("γ/β lower the val loss beyond the noise", mean < -standard_error,
              f"mean paired difference {mean:+.4f} ± {standard_error:.4f} (standard error)"),
    ))


def draw(measurements: dict[str, Any]) -> dict[str, Any]:
    """Val loss per seed for both variants; the learned γ and β of one run."""
    from normlab.diagnostics.figures import new_grid

    figure, axes = new_grid(1, 2, 12.0, 4.5)
    for offset, (variant, label) in enumerate((("affine", "with γ/β"), ("plain", "without γ/β"))):
        losses = measurements["val_loss"][variant]
        axes[0][0].plot([offset] * len(losses), losses, "o", label=label)
    axes[0][0].set(title="final val loss (calibrated statistics), one dot per seed", xticks=[0, 1],
                   xticklabels=["with γ/β", "without γ/β"], ylabel="loss")
    axes[0][1].hist(measurements["gamma"], bins=30, alpha=0.6, label="γ")
    axes[0][1].hist(measurements["beta"], bins=30, alpha=0.6, label="β")
    axes[0][1].set(title="learned γ and β of one run (initially 1 and 0)", xlabel="value", ylabel="features")
    axes[0][1].legend()
    return {"affine": figure}


def table(measurements: dict[str, Any]) -> list[str]:
    """Mean and spread of the val loss per variant, and how far γ/β moved."""
    rows = []
    for variant, label in (("affine", "with γ/β"), ("plain", "without γ/β")):
        losses = measurements["val_loss"][variant]
        rows.append([label, number(_mean(losses), ".4f"), f"{min(losses):.4f}..{max(losses):.4f}"])
    return markdown_table(["variant", "mean val loss", "range over seeds"], rows) + [
        "", f"Mean |γ - 1| after training: {_mean(measurements['gamma_mean_abs_deviation']):.3f}; mean |β|: "
            f"{_mean(measurements['beta_mean_abs']):.3f}."]


EXPERIMENT = Experiment("affine", "BatchNorm with and without γ/β", CLAIM, SETTINGS, budget, measure, check, draw,
                        table)
