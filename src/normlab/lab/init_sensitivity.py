"""init-sensitivity: final val loss over hidden weight scales from 0.1 to 10, without a norm and with BatchNorm,
for the same training budget.

The lesson's deep MLP shape (5 hidden layers of 100, Kaiming weights then multiplied by the scale, output weights
x0.01), trained with the lesson's SGD recipe (learning rate 0.1, then 0.01 from half way).

Budget (14 runs in two stacked groups): tiny 14 x 200 steps; quick 14 x 2,000 steps (about 10 s on 2 cores); full
14 x 3,000 steps (quiet 2-core time: the README's lab table).
"""

from __future__ import annotations

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

SCALES = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
NORMS = ("none", "batch")
DEEP = dict(n_layers=5, n_hidden=100)
FACTOR = 0.5  # BatchNorm's spread must be below this fraction of the spread without a norm

CLAIM = (f"BatchNorm makes training insensitive to the initial weight scale: the spread (max - min) of the final val "
         f"loss over scales {SCALES[0]:g} to {SCALES[-1]:g} with BatchNorm is less than {FACTOR:g}x the spread "
         "without a norm (a diverged run counts as an infinite loss).")


@dataclass(frozen=True)
class Settings:
    """Steps per run, the examples of the loss curves' subsets, and of the final losses (None: the whole splits)."""

    steps: int
    curve_examples: int
    final_examples: int | None


SETTINGS = {"tiny": Settings(200, 500, 2_000), "quick": Settings(2_000, 2_000, 20_000),
            "full": Settings(3_000, 5_000, None)}


def budget(settings: Settings) -> str:
    """Runs x steps."""
    return f"{len(SCALES) * len(NORMS)} runs x {settings.steps:,} steps"


def measure(settings: Settings, data: LabData, progress: bool) -> dict[str, Any]:
    """Final losses and val curves of every (norm, scale)."""
    runs = [SweepRun(f"{norm} x{scale:g}", lesson_model(norm=norm, weight_scale=scale, **DEEP),
                     train_config(settings.steps, evaluations=10, eval_examples=settings.curve_examples))
            for norm in NORMS for scale in SCALES]
    results = run_sweep(runs, data.splits, len(data.vocab), progress=progress, final_examples=settings.final_examples)
    return {"settings": asdict(settings), "scales": list(SCALES), "runs": [
        {"norm": run.model.norm, "scale": run.model.weight_scale, "val_loss": r.val_loss, "train_loss": r.train_loss,
         "diverged_at": r.diverged_at, "curve": {"step": [row["step"] for row in r.rows],
                                                 "val_loss": [row["val_loss"] for row in r.rows]}}
        for run, r in zip(runs, results)]}


def spread(measurements: dict[str, Any], norm: str) -> float:
    """max - min of the final val loss of `norm` over the scales (Inf if any run diverged)."""
    losses = [loss_or_inf(run["val_loss"]) for run in measurements["runs"] if run["norm"] == norm]
    return max(losses) - min(losses)


def check(measurements: dict[str, Any]) -> Verdict:
    """Apply the rule of `CLAIM`."""
    plain, batch = spread(measurements, "none"), spread(measurements, "batch")
    return Verdict((Check("BatchNorm's spread over scales is much smaller", batch < FACTOR * plain,
                          f"spread with BatchNorm {batch:.3f}, without a norm {plain:.3f} (ratio "
                          f"{batch / plain if plain else float('inf'):.2f} < {FACTOR:g})"),))


def draw(measurements: dict[str, Any]) -> dict[str, Any]:
    """Final val loss against the weight scale; val loss curves per scale for each norm."""
    from normlab.diagnostics.figures import new_grid

    figure, axes = new_grid(1, 3, 16.0, 4.5)
    for column, norm in enumerate(NORMS, start=1):
        runs = [run for run in measurements["runs"] if run["norm"] == norm]
        label = "no norm" if norm == "none" else "BatchNorm"
        axes[0][0].semilogx([r["scale"] for r in runs], [r["val_loss"] for r in runs], "o-", label=label)
        for run in runs:
            axes[0][column].plot(run["curve"]["step"], run["curve"]["val_loss"], label=f"scale {run['scale']:g}")
        axes[0][column].set(title=f"{label}: val loss (subset) while training", xlabel="step", ylabel="loss")
        axes[0][column].legend(fontsize="small")
    axes[0][0].set(title="final val loss against the initial weight scale", xlabel="weight scale", ylabel="loss")
    axes[0][0].legend()
    return {"init_sensitivity": figure}


def table(measurements: dict[str, Any]) -> list[str]:
    """Final val loss per scale, a column per norm, and the spreads."""
    by = {(run["norm"], run["scale"]): run["val_loss"] for run in measurements["runs"]}
    rows = [[f"{scale:g}"] + [number(by[(norm, scale)]) for norm in NORMS] for scale in measurements["scales"]]
    rows.append(["spread"] + [number(spread(measurements, norm)) for norm in NORMS])
    return markdown_table(["weight scale", "val loss, no norm", "val loss, BatchNorm"], rows)


EXPERIMENT = Experiment("init-sensitivity", "final val loss over initial weight scales, no norm vs BatchNorm", CLAIM,
                        SETTINGS, budget, measure, check, draw, table)
