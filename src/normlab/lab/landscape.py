"""landscape: how smooth the loss is along the gradient, with and without BatchNorm (Santurkar et al. 2018, "How
Does Batch Normalization Help Optimization?", section 3.1 and Figure 4), on the lesson's models.

Two pairs of models, each pair with the same initial weight scale and learning rate (the lesson's SGD recipe,
0.1 then 0.01 from half way), one with BatchNorm and one without:

    lesson   the lesson's MLP, one hidden layer of 200 (Kaiming init), norm none vs batch
    deep     `lesson-deep`: five hidden layers of 100 and a BatchNorm after the output Linear (gain 0.1), against
             the same layers without any BatchNorm (hidden biases at 0, output weights N(0, 1/fan_in) x0.1, as
             the lesson's deep network without BatchNorm)

At snapshots along training, on each of a few fixed training batches of 32 (BatchNorm in training mode: batch
statistics, as in training), in float64, with g = ∇L(w) the batch's gradient at the snapshot's weights w and
w(η) = w − η·g for the step sizes η in `STEP_SIZES`:

    loss variation          max − min of L(w(η)) over η = 0 and every step size
    gradient predictiveness max over η of ‖∇L(w(η)) − g‖        (how far the gradient turns and grows)
    effective β-smoothness  max over η of ‖∇L(w(η)) − g‖ / ‖η·g‖ (the gradient's Lipschitz constant, as seen)

each averaged over the probe batches. The step sizes 0.05–0.4 are the paper's range, and here also ½ to 4 times
the lesson's learning rate.

Budget (4 runs, one of them on the reference engine because of its output BatchNorm): tiny 4 x 200 steps; quick
4 x 2,000 steps (about 3 s on a quiet 2-core machine); full 4 x 6,000 steps (about 20 s; these times are scaled
from a shared, busy machine by train-vs-eval measured alongside).
"""

from __future__ import annotations

import copy
import statistics
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from normlab.config import ModelConfig, get_preset
from normlab.lab.common import (
    Check,
    Experiment,
    LabData,
    Verdict,
    lesson_model,
    loss_or_inf,
    markdown_table,
    number,
    train_config,
    training_batch,
)
from normlab.sweeps.runner import SweepRun, run_sweep

STEP_SIZES = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4)
PROBE_BATCH = 32  # examples per probe batch: the lesson's batch size
MEASURES = {"loss_variation": "loss variation", "gradient_change": "gradient predictiveness (max ‖Δ∇L‖)",
            "beta_smoothness": "effective β-smoothness"}
MODELS = ("lesson", "deep")

CLAIM = ("BatchNorm makes the loss landscape smoother (Santurkar et al. 2018): for the lesson's one-hidden-layer MLP "
         "and for its deep network (lesson-deep), each trained with and without BatchNorm at the same init scale and "
         "learning rate, the median over training snapshots of each of the paper's three measures along the "
         "gradient (loss variation, gradient change, effective β-smoothness) is smaller with BatchNorm than without.")


@dataclass(frozen=True)
class Settings:
    """Steps per run, snapshots after init (evenly spaced), and the training batches probed at each snapshot."""

    steps: int
    snapshots: int
    probe_batches: int


SETTINGS = {"tiny": Settings(200, 2, 1), "quick": Settings(2_000, 5, 2), "full": Settings(6_000, 10, 4)}


def budget(settings: Settings) -> str:
    """Runs x steps, and the probes."""
    return (f"4 runs x {settings.steps:,} steps; at {settings.snapshots + 1} snapshots, {settings.probe_batches} "
            f"batches x {len(STEP_SIZES) + 1} gradients")


def model_configs() -> dict[str, dict[str, ModelConfig]]:
    """The two pairs (see the module notes): {model: {"batch": config, "none": config}}."""
    deep = get_preset("lesson-deep").model
    plain_deep = replace(deep, norm="none", output_norm=False, output_bias=True, output_init="fan_in",
                         output_weight_scale=0.1, output_bias_scale=0.0, bias_scale=0.0)
    return {"lesson": {"batch": lesson_model(norm="batch"), "none": lesson_model(norm="none")},
            "deep": {"batch": deep, "none": plain_deep}}


def _loss_and_gradient(model: torch.nn.Module, parameters: list[torch.nn.Parameter], x: torch.Tensor,
                       y: torch.Tensor) -> tuple[float, torch.Tensor]:
    loss = F.cross_entropy(model(x), y)
    gradients = torch.autograd.grad(loss, parameters)
    return float(loss.detach()), torch.cat([g.reshape(-1) for g in gradients])


def probe(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
          step_sizes: tuple[float, ...] = STEP_SIZES) -> dict[str, Any]:
    """The paper's three measures at `model`'s weights along its gradient on the batch (x, y), in training mode and
    float64, on a copy (the model and its running statistics are left as they are).

    Returns the losses L(w(η)) (η = 0 first, then `step_sizes`), the gradient changes ‖∇L(w(η)) − g‖ per step size,
    ‖g‖, and the three summaries of the module notes."""
    model = copy.deepcopy(model).double().train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in parameters]
    loss, gradient = _loss_and_gradient(model, parameters, x, y)
    steps = torch.split(gradient, [p.numel() for p in parameters])
    norm = float(gradient.norm())
    losses, changes = [loss], []
    for eta in step_sizes:
        with torch.no_grad():
            for parameter, weight, step in zip(parameters, start, steps):
                parameter.copy_(weight - eta * step.view_as(weight))
        moved_loss, moved_gradient = _loss_and_gradient(model, parameters, x, y)
        losses.append(moved_loss)
        changes.append(float((moved_gradient - gradient).norm()))
    return {"losses": losses, "gradient_changes": changes, "gradient_norm": norm,
            "loss_variation": max(losses) - min(losses), "gradient_change": max(changes),
            "beta_smoothness": max(change / (eta * norm) if norm > 0 else 0.0
                                   for eta, change in zip(step_sizes, changes))}


def measure(settings: Settings, data: LabData, progress: bool) -> dict[str, Any]:
    """Train the four models, then probe every snapshot of each on the same batches."""
    configs = model_configs()
    runs = [SweepRun(f"{model} {norm}", config, train_config(settings.steps))
            for model, pair in configs.items() for norm, config in pair.items()]
    steps = [settings.steps * k // settings.snapshots for k in range(settings.snapshots + 1)]
    results = run_sweep(runs, data.splits, len(data.vocab), progress=progress, snapshot_steps=steps,
                        final_examples=data.val_examples)
    batches = [training_batch(data, PROBE_BATCH, seed=seed) for seed in range(settings.probe_batches)]
    curves = []
    for run, result in zip(runs, results):
        model, norm = run.name.split()
        probes = [[probe(result.snapshot(step), x, y) for x, y in batches] for step in steps]
        curve = {"model": model, "norm": norm, "val_loss": result.val_loss, "diverged_at": result.diverged_at,
                 "gradient_norm": [statistics.fmean(p["gradient_norm"] for p in at) for at in probes],
                 "losses": [p["losses"] for p in probes[-1]]}  # the loss along the gradient at the last snapshot
        for key in MEASURES:
            curve[key] = [statistics.fmean(p[key] for p in at) for at in probes]
        curves.append(curve)
    return {"settings": asdict(settings), "steps": steps, "step_sizes": list(STEP_SIZES), "curves": curves}


def _curve(measurements: dict[str, Any], model: str, norm: str) -> dict[str, Any]:
    return next(c for c in measurements["curves"] if c["model"] == model and c["norm"] == norm)


def medians(measurements: dict[str, Any], model: str, key: str) -> tuple[float, float]:
    """Median over snapshots of measure `key` for `model` (with BatchNorm, without); a probe that diverged (NaN,
    Inf, or None once stored) counts as +Inf."""
    return tuple(statistics.median(map(loss_or_inf, _curve(measurements, model, norm)[key]))
                 for norm in ("batch", "none"))


def check(measurements: dict[str, Any]) -> Verdict:
    """Apply the rule of `CLAIM`: one check per model and measure."""
    checks = []
    for model in MODELS:
        for key, label in MEASURES.items():
            batch, none = medians(measurements, model, key)
            checks.append(Check(f"{model}: {label.split(' (')[0]} smaller with BatchNorm", batch < none,
                                f"median {batch:.4g} with vs {none:.4g} without"))
    return Verdict(tuple(checks))


def agreement(measurements: dict[str, Any]) -> str:
    """Sentences computed from the measurements: which of the paper's three findings each model reproduces, and
    whether the loss along -g falls at every step size (then its variation is the size of the descent)."""
    sentences = []
    for model, name in (("deep", "The deep network (lesson-deep)"), ("lesson", "The lesson's one-hidden-layer MLP")):
        ratios = {label.split(" (")[0]: medians(measurements, model, key) for key, label in MEASURES.items()}
        agrees = [label for label, (batch, none) in ratios.items() if batch < none]
        disagrees = [label for label in ratios if label not in agrees]
        detail = ", ".join(f"{label} x{batch / none:.2g}" if none else f"{label} n/a"
                           for label, (batch, none) in ratios.items())
        if not disagrees:
            verdict = "agrees with the paper on all three measures"
        elif not agrees:
            verdict = "disagrees with the paper on all three measures"
        else:
            verdict = f"agrees on {', '.join(agrees)} and disagrees on {', '.join(disagrees)}"
        sentences.append(f"{name} {verdict} (with / without BatchNorm, medians over snapshots: {detail}).")
    curves = [curve["losses"] for curve in measurements["curves"]]
    falling = all(all(b < a for a, b in zip(losses, losses[1:])) for runs in curves for losses in runs)
    if falling:
        sentences.append("At the last snapshot the batch loss falls at every step size along -g, with and without "
                         "BatchNorm (no kink within 0.4): there the loss variation is the size of the descent, "
                         "which goes with the gradient norm; the effective β-smoothness divides by the step taken.")
    return " ".join(sentences)


def draw(measurements: dict[str, Any]) -> dict[str, Any]:
    """The three measures along training (a row per model), and the loss along the gradient at the end."""
    from normlab.diagnostics.figures import new_grid

    figure, axes = new_grid(len(MODELS), len(MEASURES) + 1, 20.0, 9.0)
    colors = {"batch": "tab:blue", "none": "tab:red"}
    steps, step_sizes = measurements["steps"], measurements["step_sizes"]
    for row, model in enumerate(MODELS):
        for norm in ("batch", "none"):
            curve = _curve(measurements, model, norm)
            label = "BatchNorm" if norm == "batch" else "no norm"
            for column, key in enumerate(MEASURES):
                axes[row][column].semilogy(steps, curve[key], "o-", color=colors[norm], label=label)
            for index, losses in enumerate(curve["losses"]):
                axes[row][-1].plot([0.0] + step_sizes, losses, ".-", color=colors[norm], alpha=0.6,
                                   label=label if index == 0 else None)
        for column, label in enumerate(MEASURES.values()):
            axes[row][column].set(title=f"{model}: {label}", xlabel="training step")
            axes[row][column].legend(fontsize="small")
        axes[row][-1].set(title=f"{model}: batch loss at w − ηg, last snapshot",
                          xlabel="step size η", ylabel="batch loss")
        axes[row][-1].legend(fontsize="small")
    return {"landscape": figure}


def table(measurements: dict[str, Any]) -> list[str]:
    """Per model and measure: the medians with and without BatchNorm and their ratio; then the agreement."""
    rows = []
    for model in MODELS:
        for key, label in MEASURES.items():
            batch, none = medians(measurements, model, key)
            rows.append([model, label, number(batch, ".4g"), number(none, ".4g"),
                         number(batch / none if none else float("nan"), ".3g")])
        norms = [statistics.median(_curve(measurements, model, n)["gradient_norm"]) for n in ("batch", "none")]
        rows.append([model, "gradient norm ‖g‖ (not a rule)", number(norms[0], ".4g"), number(norms[1], ".4g"),
                     number(norms[0] / norms[1] if norms[1] else float("nan"), ".3g")])
        losses = [_curve(measurements, model, n)["val_loss"] for n in ("batch", "none")]
        rows.append([model, "final val loss (not a rule)", number(losses[0], ".4f"), number(losses[1], ".4f"), ""])
    return markdown_table(["model", "median over snapshots", "BatchNorm", "no norm", "ratio"], rows) + [
        "", agreement(measurements)]


EXPERIMENT = Experiment("landscape", "smoothness of the loss along the gradient with and without BatchNorm", CLAIM,
                        SETTINGS, budget, measure, check, draw, table)
