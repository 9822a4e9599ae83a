"""data-parallel: the batch coupling of BatchNorm at cluster scale. One global batch, split over 1, 2 and 4 ranks
(processes of this machine, started by torch's elastic launcher, DDP over gloo), with per-rank BatchNorm,
SyncBatchNorm, GhostBatchNorm and LayerNorm.

Every run draws the same global batches (a pure function of seed and step) and DDP averages the ranks' gradients,
so the runs of one norm differ only in what each rank normalises with: per-rank BatchNorm normalises B/W examples
(its statistics get noisier as the ranks grow), SyncBatchNorm the whole batch over all ranks (the one-process run,
step for step), GhostBatchNorm ghost batches of the smallest per-rank batch (the same chunks at every rank count:
on one process it trains exactly as per-rank BatchNorm on the most ranks, while its running statistics see every
chunk), LayerNorm each example alone. Measured: the
final val loss (running statistics in eval mode) and the running-statistics error of the first norm (rank 0's
buffers against the population statistics of its input over the training examples: `common.tracking_error`),
with the BatchNorm momentum at torch's 0.1, so that the running statistics follow the last batches' noise.

Budget (one launch per rank count above 1, every norm trained in it): tiny 4 norms x ranks 1, 2 x 100 steps; quick
4 x ranks 1, 4 x 300 steps; full 4 x ranks 1, 4 x 600 steps (global batch 16: per-rank 16 and 4; 2 ranks would
halve the per-rank batch only, which the rule's 1.5x growth of the error cannot reliably see). Four ranks on this
project's 2 cores are oversubscribed: slower, never different in result.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from normlab.data import random_subset
from normlab.lab.common import (
    Check,
    Experiment,
    LabData,
    Verdict,
    lesson_model,
    markdown_table,
    number,
    population_statistics,
    tracking_error,
    train_config,
    training_batch,
)
from normlab.training import create_engine, evaluate, train_loop

NORMS = ("batch", "syncbatch", "ghostbatch", "layer")
LABELS = {"batch": "per-rank BatchNorm", "syncbatch": "SyncBatchNorm", "ghostbatch": "GhostBatchNorm",
          "layer": "LayerNorm"}
MOMENTUM = 0.1
RISE = 0.005  # per-rank BatchNorm's val loss at the most ranks must exceed its one-process loss by more than this
SAME = 0.002  # SyncBatchNorm's val loss at every rank count must stay within this of its one-process loss
FACTOR = 1.5  # per-rank BatchNorm's running-statistics error must grow by more than this factor

CLAIM = (f"With a fixed global batch, per-rank BatchNorm degrades as the per-rank batch shrinks and SyncBatchNorm "
         f"does not: at the most ranks, per-rank BatchNorm's final val loss is more than {RISE:g} above its one-"
         f"process loss and its running-statistics error more than {FACTOR:g}x its one-process error, while "
         f"SyncBatchNorm's val loss stays within {SAME:g} of its one-process loss at every rank count and its error "
         f"within 10%.")


@dataclass(frozen=True)
class Settings:
    """Rank counts, the global batch, steps per run, and the examples the losses and statistics are taken over."""

    ranks: tuple[int, ...]
    batch_size: int
    steps: int
    final_examples: int | None
    population_examples: int | None


SETTINGS = {"tiny": Settings((1, 2), 16, 100, 2_000, 5_000),
            "quick": Settings((1, 4), 16, 300, 20_000, 50_000),
            "full": Settings((1, 4), 16, 600, None, None)}


def budget(settings: Settings) -> str:
    """Runs x steps."""
    ranks = ", ".join(map(str, settings.ranks))
    return (f"{len(NORMS)} norms x {len(settings.ranks)} rank counts ({ranks}; global batch {settings.batch_size}) "
            f"= {len(NORMS) * len(settings.ranks)} runs x {settings.steps:,} steps")


def measure(settings: Settings, data: LabData, progress: bool) -> dict[str, Any]:
    """Final val loss and running-statistics error per norm and rank count."""
    from normlab.runs.launch import run_processes

    runs: dict[int, dict[str, dict[str, float | None]]] = {}
    for ranks in settings.ranks:
        if ranks == 1:  # the one-process run, here
            runs[1] = train_norms(settings, data)
        else:
            runs[ranks] = run_processes(train_norms, (settings, data), ranks)[0]
    return {"settings": asdict(settings), "ranks": list(settings.ranks),
            "val_loss": {norm: [runs[r][norm]["val_loss"] for r in settings.ranks] for norm in NORMS},
            "stats_error": {norm: [runs[r][norm]["stats_error"] for r in settings.ranks] for norm in NORMS}}


def train_norms(settings: Settings, data: LabData) -> dict[str, dict[str, float | None]] | None:
    """Train every norm on the ranks of the launch this process belongs to (or alone, outside one); rank 0's
    measurements (None on the other ranks)."""
    import torch.distributed as dist

    from normlab.runs.ranks import joined, launched

    torch.set_num_threads(1)
    if not launched():
        return {norm: _train(norm, settings, data, "reference") for norm in NORMS}
    with joined():
        results = {norm: _train(norm, settings, data, "ddp") for norm in NORMS}
        return results if dist.get_rank() == 0 else None


def _train(norm: str, settings: Settings, data: LabData, engine_name: str) -> dict[str, float | None]:
    smallest = settings.batch_size // max(settings.ranks)
    model_config = lesson_model(norm=norm, bn_momentum=MOMENTUM, ghost_batch_size=smallest)
    config = train_config(settings.steps, batch_size=settings.batch_size, engine=engine_name)
    engine = create_engine([model_config], [config], len(data.vocab), data.splits.train)
    train_loop(engine, [config], data.splits.train, data.splits.val, progress=False)
    model = engine.modules()[0]
    val = random_subset(data.splits.val, settings.final_examples, torch.Generator().manual_seed(2))
    error = None
    if norm != "layer":
        x = (data.splits.train[0] if settings.population_examples is None
             else training_batch(data, settings.population_examples)[0])
        error = tracking_error(model, population_statistics(model, x))
    return {"val_loss": evaluate(model, *val), "stats_error": error}


def check(measurements: dict[str, Any]) -> Verdict:
    """Apply the rule of `CLAIM`."""
    val, error = measurements["val_loss"], measurements["stats_error"]
    rise = val["batch"][-1] - val["batch"][0]
    growth = error["batch"][-1] / error["batch"][0]
    sync_drift = max(abs(value - val["syncbatch"][0]) for value in val["syncbatch"])
    sync_growth = max(value / error["syncbatch"][0] for value in error["syncbatch"])
    most = measurements["ranks"][-1]
    return Verdict((
        Check(f"per-rank BatchNorm's val loss rises by more than {RISE:g} at {most} ranks", rise > RISE,
              f"{val['batch'][0]:.4f} -> {val['batch'][-1]:.4f} ({rise:+.4f})"),
        Check(f"per-rank BatchNorm's running-statistics error grows more than {FACTOR:g}x", growth > FACTOR,
              f"{error['batch'][0]:.4f} -> {error['batch'][-1]:.4f} ({growth:.2f}x)"),
        Check(f"SyncBatchNorm's val loss stays within {SAME:g}", sync_drift <= SAME,
              f"largest change {sync_drift:.5f} over ranks {measurements['ranks']}"),
        Check("SyncBatchNorm's running-statistics error stays within 10%", sync_growth <= 1.1,
              f"largest ratio {sync_growth:.3f}"),
    ))


def draw(measurements: dict[str, Any]) -> dict[str, Any]:
    """Val loss and running-statistics error against the rank count, a line per norm."""
    from normlab.diagnostics.figures import new_grid

    figure, axes = new_grid(1, 2, 12.0, 4.5)
    ranks = measurements["ranks"]
    for norm in NORMS:
        axes[0][0].plot(ranks, measurements["val_loss"][norm], "o-", label=LABELS[norm])
        if norm != "layer":
            axes[0][1].plot(ranks, measurements["stats_error"][norm], "o-", label=LABELS[norm])
    batch = measurements["settings"]["batch_size"]
    axes[0][0].set(title=f"final val loss, global batch {batch}", xlabel="ranks", ylabel="loss", xticks=ranks)
    axes[0][1].set(title="running-statistics error (rank 0)", xlabel="ranks", ylabel="error", xticks=ranks)
    for axis in axes[0]:
        axis.legend()
    return {"data_parallel": figure}


def table(measurements: dict[str, Any]) -> list[str]:
    """Per norm and rank count: val loss and running-statistics error."""
    batch = measurements["settings"]["batch_size"]
    rows = [[LABELS[norm]] + [f"{number(measurements['val_loss'][norm][i])} / "
                              f"{number(measurements['stats_error'][norm][i], '.4f')}"
                              for i in range(len(measurements["ranks"]))] for norm in NORMS]
    header = ["norm (val loss / statistics error)"] + [f"{r} rank(s), {batch // r} a rank"
                                                        for r in measurements["ranks"]]
    return markdown_table(header, rows)


EXPERIMENT = Experiment("data-parallel", "BatchNorm across ranks: per-rank, synchronised, ghost, layer", CLAIM,
                        SETTINGS, budget, measure, check, draw, table)
