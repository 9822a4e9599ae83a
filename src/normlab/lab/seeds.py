"""seeds: final val loss over several seeds for each norm, mean ± std: the run-to-run noise that any comparison
between configurations must beat.

The lesson's MLP (one hidden layer of 200, Kaiming init) with each norm after its hidden Linear, trained with the
lesson's SGD recipe; a seed sets both the initial weights and the batches.

Budget (5 stacked groups): tiny 5 norms x 3 seeds x 300 steps; quick 5 x 5 x 3,000 steps (about 12 s on 2
cores); full 5 x 5 x 5,000 steps
(quiet 2-core time: the README's lab table).
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Any

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
)
from normlab.sweeps.runner import SweepRun, run_sweep

NORMS = ("none", "batch", "layer", "group", "rms")
MARGIN = 2.0  # the best and worst norm's means must differ by more than this many times the largest seed std

CLAIM = ("Seeds matter, but less than the choice of norm: every norm's final val loss varies across seeds (std > 0), "
         f"and the gap between the best and the worst norm's mean is more than {MARGIN:g}x the largest per-norm std "
         "(a diverged run counts as an infinite loss).")


@dataclass(frozen=True)
class Settings:
    """Steps per run, seeds per norm, and the examples the final losses are measured on (None: all)."""

    steps: int
    seeds: int
    final_examples: int | None


SETTINGS = {"tiny": Settings(300, 3, 2_000), "quick": Settings(3_000, 5, 20_000),
            "full": Settings(5_000, 5, None)}


def budget(settings: Settings) -> str:
    """Runs x steps."""
    runs = len(NORMS) * settings.seeds
    return f"{len(NORMS)} norms x {settings.seeds} seeds = {runs} runs x {settings.steps:,} steps"


def measure(settings: Settings, data: LabData, progress: bool) -> dict[str, Any]:
    """Final val losses per norm and seed."""
    runs = [SweepRun(f"{norm} seed {seed}", lesson_model(norm=norm), train_config(settings.steps, seed=seed))
            for norm in NORMS for seed in range(settings.seeds)]
    results = run_sweep(runs, data.splits, len(data.vocab), progress=progress, final_examples=settings.final_examples)
    return {"settings": asdict(settings), "val_loss": {
        norm: [r.val_loss for run, r in zip(runs, results) if run.model.norm == norm] for norm in NORMS}}


def summary(losses: list[float]) -> tuple[float, float]:
    """Mean and sample std (Inf when a run diverged)."""
    values = [loss_or_inf(loss) for loss in losses]
    if any(v == float("inf") for v in values):
        return float("inf"), float("inf")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def check(measurements: dict[str, Any]) -> Verdict:
    """Apply the rule of `CLAIM`."""
    stats = {norm: summary(losses) for norm, losses in measurements["val_loss"].items()}
    means = [mean for mean, _ in stats.values()]
    stds = [std for _, std in stats.values()]
    gap, noise = max(means) - min(means), max(stds)
    return Verdict((
        Check("runs differ across seeds", all(std > 0 for std in stds),
              "std " + ", ".join(f"{norm} {std:.4f}" for norm, (_, std) in stats.items())),
        Check("the norms differ by more than the noise", gap > MARGIN * noise,
              f"best-to-worst gap {gap:.4f} vs {MARGIN:g} x largest std {noise:.4f}"),
    ))


def draw(measurements: dict[str, Any]) -> dict[str, Any]:
    """Every run's final val loss per norm, with mean ± std."""
    from normlab.diagnostics.figures import new_grid

    figure, axes = new_grid(1, 1, 8.0, 5.0)
    axis = axes[0][0]
    for position, losses in enumerate(measurements["val_loss"].values()):
        axis.plot([position] * len(losses), losses, "o", alpha=0.5, color="tab:blue")
        mean, std = summary(losses)
        axis.errorbar([position + 0.15], [mean], yerr=[std], fmt="s", color="tab:red", capsize=4)
    axis.set(title="final val loss per seed (blue) and mean ± std (red)", ylabel="loss",
             xticks=range(len(measurements["val_loss"])), xticklabels=list(measurements["val_loss"]))
    return {"seeds": figure}


def table(measurements: dict[str, Any]) -> list[str]:
    """Mean ± std, min and max per norm."""
    rows = []
    for norm, losses in measurements["val_loss"].items():
        mean, std = summary(losses)
        values = [loss_or_inf(loss) for loss in losses]
        rows.append([norm, f"{number(mean, '.4f')} ± {number(std, '.4f')}", number(min(values), ".4f"),
                     number(max(values), ".4f")])
    return markdown_table(["norm", "val loss mean ± std", "min", "max"], rows)


EXPERIMENT = Experiment("seeds", "run-to-run noise of the final val loss for each norm", CLAIM, SETTINGS, budget,
                        measure, check, draw, table)
