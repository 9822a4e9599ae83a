"""momentum: how well BatchNorm's running statistics track the true population statistics, and the val loss they
give, for running-statistic momenta from 0.001 to 0.5.

The momentum changes only the running statistics, never the training (which normalises with batch statistics),
so the runs share every weight and differ in their running statistics alone. At snapshots through training, the
tracking error of a run is the root mean square over features of (running mean - population mean) / population
std and log(running std / population std), the population being the BatchNorm input over the train examples
(a fixed subset in quick mode).

Budget (7 runs in one stacked group): tiny 7 x 400 steps; quick 7 x 4,000 steps (about 5 s on 2 cores); full
7 x 4,000 steps (quiet 2-core time: the README's lab table).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, replace
from typing import Any

from normlab.config import get_preset
from normlab.lab.common import (
    Check,
    Experiment,
    LabData,
    Verdict,
    markdown_table,
    number,
    population_statistics,
    tracking_error,
    train_config,
    training_batch,
)
from normlab.sweeps.runner import SweepRun, run_sweep
from normlab.training import calibrate_batchnorm, evaluate

MOMENTA = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 0.5)
EARLY = 40  # the early snapshot comes after 1/EARLY of training: within the slowest momentum's time constant
SNAPSHOTS = 10  # then the tracking error is measured after every tenth of training
FACTOR = 1.5  # "worse": a tracking error above this multiple of the best of the grid

CLAIM = (f"Momentum trades smoothness for speed: after the first 1/{EARLY} of training the smallest momentum "
         f"({MOMENTA[0]:g}) tracks the population statistics worse (error > {FACTOR:g}x the best of the grid) because "
         f"it is slow, and at the end the largest ({MOMENTA[-1]:g}) tracks worse (> {FACTOR:g}x the best) because "
         "it follows the noise of the last few batches.")


@dataclass(frozen=True)
class Settings:
    """Steps per run, and the training examples the population statistics are taken over (None: all)."""

    steps: int
    population_examples: int | None
    final_examples: int | None


SETTINGS = {"tiny": Settings(400, 5_000, 2_000), "quick": Settings(4_000, 50_000, 20_000),
            "full": Settings(4_000, None, None)}


def budget(settings: Settings) -> str:
    """Runs x steps."""
    return f"{len(MOMENTA)} runs x {settings.steps:,} steps, {SNAPSHOTS + 1} snapshots each"


def measure(settings: Settings, data: LabData, progress: bool) -> dict[str, Any]:
    """Tracking errors at each snapshot, and val losses with running and calibrated statistics."""
    x_population = (data.splits.train[0] if settings.population_examples is None
                    else training_batch(data, settings.population_examples)[0])
    base = get_preset("lesson-batchnorm").model
    runs = [SweepRun(f"momentum {m:g}", replace(base, bn_momentum=m), train_config(settings.steps)) for m in MOMENTA]
    steps = [settings.steps // EARLY] + [settings.steps * k // SNAPSHOTS for k in range(1, SNAPSHOTS + 1)]
    results = run_sweep(runs, data.splits, len(data.vocab), progress=progress, snapshot_steps=steps,
                        final_examples=settings.final_examples)
    populations = {step: population_statistics(results[0].snapshot(step), x_population) for step in steps}
    final = results[0].snapshot(steps[-1])
    calibrated = copy.deepcopy(final)
    calibrate_batchnorm(calibrated, data.splits.train[0])
    return {"settings": asdict(settings), "momenta": list(MOMENTA), "steps": steps,
            "tracking_error": [[tracking_error(r.snapshot(step), populations[step]) for step in steps]
                               for r in results],
            "val_loss": [r.val_loss for r in results], "val_loss_calibrated": evaluate(calibrated, *data.splits.val)}


def check(measurements: dict[str, Any]) -> Verdict:
    """Apply the rule of `CLAIM` to the first and the last snapshot."""
    errors = measurements["tracking_error"]
    early, late = [row[0] for row in errors], [row[-1] for row in errors]
    return Verdict((
        Check(f"early: momentum {MOMENTA[0]:g} is slow", early[0] > FACTOR * min(early),
              f"error {early[0]:.3f} vs best {min(early):.3f} (momentum "
              f"{measurements['momenta'][early.index(min(early))]:g})"),
        Check(f"end: momentum {MOMENTA[-1]:g} is noisy", late[-1] > FACTOR * min(late),
              f"error {late[-1]:.3f} vs best {min(late):.3f} (momentum "
              f"{measurements['momenta'][late.index(min(late))]:g})"),
    ))


def draw(measurements: dict[str, Any]) -> dict[str, Any]:
    """Tracking error over training per momentum; final tracking error and val loss against the momentum."""
    from normlab.diagnostics.figures import new_grid

    figure, axes = new_grid(1, 3, 16.0, 4.5)
    momenta = measurements["momenta"]
    for momentum, row in zip(momenta, measurements["tracking_error"]):
        axes[0][0].semilogy(measurements["steps"], row, marker=".", label=f"momentum {momentum:g}")
    axes[0][0].set(title="tracking error of the running statistics", xlabel="step", ylabel="RMS error")
    axes[0][0].legend(fontsize="small")
    early = f"after {measurements['steps'][0]:,} steps"
    axes[0][1].loglog(momenta, [row[0] for row in measurements["tracking_error"]], "o-", label=early)
    axes[0][1].loglog(momenta, [row[-1] for row in measurements["tracking_error"]], "o-", label="at the end")
    axes[0][1].set(title="tracking error against the momentum", xlabel="momentum", ylabel="RMS error")
    axes[0][1].legend()
    axes[0][2].semilogx(momenta, measurements["val_loss"], "o-", label="running statistics")
    axes[0][2].axhline(measurements["val_loss_calibrated"], color="gray", linestyle="--",
                       label="calibrated population statistics")
    axes[0][2].set(title="final val loss", xlabel="momentum", ylabel="loss")
    axes[0][2].legend()
    return {"momentum": figure}


def table(measurements: dict[str, Any]) -> list[str]:
    """Per momentum: the tracking error early and at the end, the val loss."""
    rows = [[f"{m:g}", number(row[0], ".4f"), number(row[-1], ".4f"), number(loss, ".4f")]
            for m, row, loss in zip(measurements["momenta"], measurements["tracking_error"],
                                    measurements["val_loss"])]
    early = f"error after {measurements['steps'][0]:,} steps"
    return markdown_table(["momentum", early, "error at the end", "val loss (running)"], rows) + [
        "", f"Val loss with calibrated population statistics: {measurements['val_loss_calibrated']:.4f}."]


EXPERIMENT = Experiment("momentum", "BatchNorm's running-statistic momentum: tracking error and val loss", CLAIM,
                        SETTINGS, budget, measure, check, draw, table)
