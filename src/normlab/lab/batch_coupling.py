"""batch-coupling: final val loss over batch sizes from 2 to 256 for BatchNorm, LayerNorm, GroupNorm, RMSNorm
and no norm.

The lesson's MLP (one hidden layer of 200, Kaiming init) with each norm, the same number of SGD steps at every
batch size (so small batches also see fewer examples, for every norm alike). BatchNorm normalises each example
with statistics of its batch, so its small-batch runs also suffer from noisy statistics and from the gap between
batch and running statistics; the per-example norms do not.

Budget (one run per norm and batch size; the batch size cannot be stacked): tiny 5 x 3 runs x 300 steps; quick
5 x 5 runs x 1,500 steps (about 15 s on 2 cores); full 5 x 4 runs (batch 2, 8, 32,
128) x 3,000 steps (quiet 2-core time: the README's lab table).
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

NORMS = ("none", "batch", "layer", "group", "rms")
PER_EXAMPLE = ("layer", "group", "rms")

CLAIM = ("BatchNorm couples the examples of a batch, so it degrades most at small batches: its gap between the val "
         "loss at the smallest batch size and its best val loss over batch sizes is larger than that gap for each "
         "per-example norm (LayerNorm, GroupNorm, RMSNorm).")


@dataclass(frozen=True)
class Settings:
    """Batch sizes, steps per run, and the examples the final losses are measured on (None: all)."""

    batch_sizes: tuple[int, ...]
    steps: int
    final_examples: int | None


SETTINGS = {"tiny": Settings((2, 16, 128), 300, 2_000), "quick": Settings((2, 4, 16, 64, 256), 1_500, 20_000),
            "full": Settings((2, 8, 32, 128), 3_000, None)}


def budget(settings: Settings) -> str:
    """Runs x steps."""
    sizes = ", ".join(map(str, settings.batch_sizes))
    return (f"{len(NORMS)} norms x {len(settings.batch_sizes)} batch sizes ({sizes}) = "
            f"{len(NORMS) * len(settings.batch_sizes)} runs x {settings.steps:,} steps")


def measure(settings: Settings, data: LabData, progress: bool) -> dict[str, Any]:
    """Final val loss per norm and batch size."""
    runs = [SweepRun(f"{norm} batch {size}", lesson_model(norm=norm), train_config(settings.steps, batch_size=size))
            for norm in NORMS for size in settings.batch_sizes]
    results = run_sweep(runs, data.splits, len(data.vocab), progress=progress, final_examples=settings.final_examples)
    return {"settings": asdict(settings), "batch_sizes": list(settings.batch_sizes), "val_loss": {
        norm: [r.val_loss for run, r in zip(runs, results) if run.model.norm == norm] for norm in NORMS}}


def small_batch_gap(losses: list[float]) -> float:
    """Val loss at the smallest batch size minus the best over batch sizes (Inf if the small-batch run diverged)."""
    values = [loss_or_inf(loss) for loss in losses]
    return values[0] - min(values)


def check(measurements: dict[str, Any]) -> Verdict:
    """Apply the rule of `CLAIM`."""
    gaps = {norm: small_batch_gap(losses) for norm, losses in measurements["val_loss"].items()}
    return Verdict(tuple(
        Check(f"BatchNorm degrades more than {norm}", gaps["batch"] > gaps[norm],
              f"small-batch gap {gaps['batch']:.3f} (BatchNorm) vs {gaps[norm]:.3f} ({norm})")
        for norm in PER_EXAMPLE))


def draw(measurements: dict[str, Any]) -> dict[str, Any]:
    """Final val loss against the batch size, a line per norm."""
    from normlab.diagnostics.figures import new_grid

    figure, axes = new_grid(1, 1, 8.0, 5.0)
    axis = axes[0][0]
    for norm, losses in measurements["val_loss"].items():
        axis.semilogx(measurements["batch_sizes"], losses, "o-", base=2, label=norm)
    axis.set(title="final val loss against the batch size (same number of steps)", xlabel="batch size",
             ylabel="loss")
    axis.legend()
    return {"batch_coupling": figure}


def table(measurements: dict[str, Any]) -> list[str]:
    """Val loss per batch size, a column per norm, and each norm's small-batch gap."""
    norms = list(measurements["val_loss"])
    rows = [[str(size)] + [number(measurements["val_loss"][norm][i]) for norm in norms]
            for i, size in enumerate(measurements["batch_sizes"])]
    rows.append(["small-batch gap"] + [number(small_batch_gap(measurements["val_loss"][norm])) for norm in norms])
    return markdown_table(["batch size"] + norms, rows)


EXPERIMENT = Experiment("batch-coupling", "val loss over batch sizes for every norm", CLAIM, SETTINGS, budget,
                        measure, check, draw, table)
