"""learning-rate: final val loss over a log grid of learning rates, without a norm and with BatchNorm, and the
largest rate each trains at.

The same 5-layer MLP as init-sensitivity (Kaiming init, scale 1), trained with SGD at each rate (x0.1 from half
way). A run is *stable* when its final val loss is finite and below -log(1/vocab) (it learned something); it is
*good* when its final val loss is within 0.1 of the best of its norm over the grid.

Budget (14 runs in two stacked groups): tiny 14 x 200 steps; quick 14 x 2,000 steps (about 12 s on 2 cores); full
14 x 4,000 steps (quiet 2-core time: the README's lab table).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from normlab.lab.common import (
    Check,
    Experiment,
    LabData,
    Verdict,
    finite,
    lesson_model,
    markdown_table,
    number,
    train_config,
)
from normlab.sweeps.runner import SweepRun, run_sweep

RATES = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
NORMS = ("none", "batch")
DEEP = dict(n_layers=5, n_hidden=100)
GOOD = 0.1  # a rate is good when its final val loss is within this of the best of its norm

CLAIM = ("BatchNorm allows higher learning rates: its largest stable rate (final val loss finite and below "
         "-log(1/vocab)) is at least that without a norm, and its largest good rate (final val loss within "
         f"{GOOD:g} of its best over the grid) is higher than without a norm.")


@dataclass(frozen=True)
class Settings:
    """Steps per run, and the examples the final losses are measured on (None: the whole splits)."""

    steps: int
    final_examples: int | None


SETTINGS = {"tiny": Settings(200, 2_000), "quick": Settings(2_000, 20_000), "full": Settings(4_000, None)}


def budget(settings: Settings) -> str:
    """Runs x steps."""
    return f"{len(RATES) * len(NORMS)} runs x {settings.steps:,} steps"


def measure(settings: Settings, data: LabData, progress: bool) -> dict[str, Any]:
    """Final losses of every (norm, rate)."""
    runs = [SweepRun(f"{norm} lr {lr:g}", lesson_model(norm=norm, **DEEP), train_config(settings.steps, lr=lr))
            for norm in NORMS for lr in RATES]
    results = run_sweep(runs, data.splits, len(data.vocab), progress=progress, final_examples=settings.final_examples)
    return {"settings": asdict(settings), "rates": list(RATES), "uniform_loss": data.uniform_loss, "runs": [
        {"norm": run.model.norm, "lr": run.train.lr, "val_loss": r.val_loss, "train_loss": r.train_loss,
         "diverged_at": r.diverged_at} for run, r in zip(runs, results)]}


def largest_rates(measurements: dict[str, Any], norm: str) -> tuple[float | None, float | None]:
    """The largest stable and the largest good learning rate of `norm` (None if there is none)."""
    runs = [run for run in measurements["runs"] if run["norm"] == norm]
    stable = [run for run in runs if finite(run["val_loss"]) and run["val_loss"] < measurements["uniform_loss"]]
    if not stable:
        return None, None
    best = min(run["val_loss"] for run in stable)
    good = [run["lr"] for run in stable if run["val_loss"] <= best + GOOD]
    return max(run["lr"] for run in stable), max(good)


def check(measurements: dict[str, Any]) -> Verdict:
    """Apply the rule of `CLAIM`."""
    (plain_stable, plain_good), (batch_stable, batch_good) = (largest_rates(measurements, n) for n in NORMS)
    return Verdict((
        Check("largest stable rate: BatchNorm >= no norm",
              batch_stable is not None and (plain_stable is None or batch_stable >= plain_stable),
              f"BatchNorm {number(batch_stable, 'g')}, no norm {number(plain_stable, 'g')}"),
        Check("largest good rate: BatchNorm > no norm",
              batch_good is not None and (plain_good is None or batch_good > plain_good),
              f"BatchNorm {number(batch_good, 'g')}, no norm {number(plain_good, 'g')}"),
    ))


def draw(measurements: dict[str, Any]) -> dict[str, Any]:
    """Final val loss against the learning rate (diverged runs marked), with -log(1/vocab) as a guide."""
    from normlab.diagnostics.figures import new_grid

    figure, axes = new_grid(1, 1, 8.0, 5.0)
    axis = axes[0][0]
    for norm in NORMS:
        runs = [run for run in measurements["runs"] if run["norm"] == norm]
        label = "no norm" if norm == "none" else "BatchNorm"
        axis.loglog([r["lr"] for r in runs], [r["val_loss"] if finite(r["val_loss"]) else None for r in runs], "o-",
                    label=label)
        broken = [r["lr"] for r in runs if not finite(r["val_loss"])]
        if broken:
            axis.plot(broken, [measurements["uniform_loss"]] * len(broken), "x", markersize=10,
                      label=f"{label}: diverged")
    axis.axhline(measurements["uniform_loss"], color="gray", linestyle="--", label="-log(1/vocab)")
    axis.set(title="final val loss against the learning rate", xlabel="learning rate", ylabel="loss")
    axis.legend()
    return {"learning_rate": figure}


def table(measurements: dict[str, Any]) -> list[str]:
    """Final val loss per rate, a column per norm, and the largest rates."""
    by = {(run["norm"], run["lr"]): run for run in measurements["runs"]}

    def cell(run: dict[str, Any]) -> str:
        return f"diverged at {run['diverged_at']}" if run["diverged_at"] is not None else number(run["val_loss"])

    rows = [[f"{lr:g}"] + [cell(by[(norm, lr)]) for norm in NORMS] for lr in measurements["rates"]]
    for index, what in enumerate(("largest stable rate", "largest good rate")):
        rows.append([what] + [number(largest_rates(measurements, norm)[index], "g") for norm in NORMS])
    return markdown_table(["learning rate", "val loss, no norm", "val loss, BatchNorm"], rows)


EXPERIMENT = Experiment("learning-rate", "final val loss over learning rates, no norm vs BatchNorm", CLAIM, SETTINGS,
                        budget, measure, check, draw, table)
