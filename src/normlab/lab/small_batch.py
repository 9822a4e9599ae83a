"""small-batch: BatchNorm's weakness at batch sizes 2 to 32, and what Batch Renormalization (Ioffe 2017) does
about it, against GhostBatchNorm and the per-example norms (LayerNorm, GroupNorm).

The lesson's MLP (one hidden layer of 200, Kaiming init) with each norm after its hidden Linear, the lesson's SGD
(0.1, x0.1 at half) for the same number of steps at every batch size, on several seeds. The batch norms keep
running statistics with momentum 0.01 (Ioffe's 0.99 in his convention; the same for every batch norm, so that only
the normalisation in training differs), and the val loss is measured in eval mode, with those running statistics,
as a deployed model is. Batch Renorm starts as BatchNorm for the first `HOLD` of the steps, then relaxes its clips
linearly over the next `WARMUP` of them to r_max = 3 and d_max = 5 (the paper held 5,000 of its steps and reached
its final limits by 25,000-40,000; here the schedule is scaled to the budget).

GhostBatchNorm normalises ghost batches of `GHOST` examples inside a batch: it is run once, at the largest batch
size, where it has the statistics of the smallest batch and the gradient of the largest. It splits BatchNorm's
small-batch gap into the part due to noisy statistics (ghost at the largest batch minus BatchNorm there) and the
part due to the small batch itself, its noisier gradients and fewer examples (BatchNorm at the smallest minus
ghost); it trains on the reference engine.
Not part of the rule: the val loss of the batch norms with running statistics replaced by population statistics
calibrated on training examples (how much of the gap is the running statistics').

Rule, on the means over seeds: a norm's small-batch gap is its val loss at the smallest batch minus its best over
batch sizes; part of it, the fewer examples and noisier gradients of small batches, every norm pays, and the rest
of BatchNorm's is its excess over the per-example norms (the mean of LayerNorm's and GroupNorm's gaps). Batch
Renorm closes BatchNorm's gap when (1) its gap is smaller than BatchNorm's by more than K = 3 standard errors (each
gap is a difference of two means of n seeds, so the difference of two gaps has standard error s·√(4/n), s the
pooled seed std over every norm and batch size), and (2) it removes at least half of BatchNorm's excess.

Budget (one stacked group per norm and batch size, a reference run for the ghost batches): tiny 4 norms x 2 batch
sizes x 2 seeds x 200 steps; quick 4 x 5 x 2 runs x 2,000 steps (about 9 s on a quiet 2-core machine); full 4 x 3
batch sizes (2, 8, 32: the best is at 32 for every norm) x 2 runs x 6,000 steps and the ghost run
(quiet 2-core time: the README's lab table).
"""

from __future__ import annotations

import math
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
    pooled_std,
    train_config,
    training_batch,
)
from normlab.sweeps.runner import SweepRun, run_sweep
from normlab.training import calibrate_batchnorm, evaluate

BATCH_SIZES = (2, 4, 8, 16, 32)
NORMS = ("batch", "batchrenorm", "layer", "group")  # on the stacked engine, every batch size
BATCH_NORMS = ("batch", "batchrenorm")
PER_EXAMPLE = ("layer", "group")
MOMENTUM = 0.01  # of the running statistics of every batch norm
HOLD, WARMUP = 0.05, 0.25  # Batch Renorm's schedule, as fractions of the steps
GHOST = 2  # examples per ghost batch
K = 3.0  # standard errors by which Batch Renorm's gap must be below BatchNorm's
HALF = 0.5  # the share of BatchNorm's excess gap over the per-example norms Batch Renorm must remove
CALIBRATION_EXAMPLES = 20_000

CLAIM = ("Batch Renormalization closes BatchNorm's small-batch gap (val loss in eval mode with running "
         f"statistics, means over seeds, a norm's gap being its loss at batch {BATCH_SIZES[0]} minus its best over "
         f"batch sizes {BATCH_SIZES[0]}-{BATCH_SIZES[-1]}): Batch Renorm's gap is smaller than BatchNorm's by more "
         f"than {K:g} standard errors, and by at least {HALF:.0%} of BatchNorm's excess over the per-example norms' "
         "gap (the mean of LayerNorm's and GroupNorm's).")


@dataclass(frozen=True)
class Settings:
    """Batch sizes, steps per run (every batch size), seeds per norm and batch size, seeds of the ghost run."""

    batch_sizes: tuple[int, ...]
    steps: int
    seeds: int
    ghost_seeds: int


SETTINGS = {"tiny": Settings((2, 32), 200, 2, 1), "quick": Settings((2, 4, 8, 16, 32), 2_000, 2, 1),
            "full": Settings((2, 8, 32), 6_000, 2, 1)}


def budget(settings: Settings) -> str:
    """Runs x steps."""
    runs = len(NORMS) * len(settings.batch_sizes) * settings.seeds
    return (f"{len(NORMS)} norms x {len(settings.batch_sizes)} batch sizes x {settings.seeds} seeds = {runs} runs, "
            f"and {settings.ghost_seeds} ghost-batch run(s), x {settings.steps:,} steps")


def norm_config(norm: str, steps: int):
    """The lesson's MLP with `norm` (see the module notes for the batch norms' settings)."""
    if norm == "batchrenorm":
        return lesson_model(norm=norm, bn_momentum=MOMENTUM, renorm_hold_steps=round(HOLD * steps),
                            renorm_warmup_steps=round(WARMUP * steps))
    if norm == "ghostbatch":
        return lesson_model(norm=norm, bn_momentum=MOMENTUM, ghost_batch_size=GHOST)
    return lesson_model(norm=norm, bn_momentum=MOMENTUM)


def measure(settings: Settings, data: LabData, progress: bool) -> dict[str, Any]:
    """Val losses (running and calibrated statistics) of every norm, batch size and seed; the ghost runs."""
    largest = settings.batch_sizes[-1]
    runs = [SweepRun(f"{norm} batch {size} seed {seed}", norm_config(norm, settings.steps),
                     train_config(settings.steps, batch_size=size, seed=seed))
            for norm in NORMS for size in settings.batch_sizes for seed in range(settings.seeds)]
    runs += [SweepRun(f"ghostbatch batch {largest} seed {seed}", norm_config("ghostbatch", settings.steps),
                      train_config(settings.steps, batch_size=largest, seed=seed))
             for seed in range(settings.ghost_seeds)]
    results = run_sweep(runs, data.splits, len(data.vocab), progress=progress, final_examples=data.val_examples,
                        keep_models=True)
    x_calibration, _ = training_batch(data, CALIBRATION_EXAMPLES)
    val_loss: dict[str, list[list[float]]] = {norm: [] for norm in NORMS}
    calibrated: dict[str, list[list[float]]] = {norm: [] for norm in BATCH_NORMS}
    by_name = {run.name: result for run, result in zip(runs, results)}
    for norm in NORMS:
        for size in settings.batch_sizes:
            group = [by_name[f"{norm} batch {size} seed {seed}"] for seed in range(settings.seeds)]
            val_loss[norm].append([r.val_loss for r in group])
            if norm in BATCH_NORMS:
                calibrated[norm].append([_calibrated_loss(r, x_calibration, data) for r in group])
    ghosts = [by_name[f"ghostbatch batch {largest} seed {seed}"] for seed in range(settings.ghost_seeds)]
    return {"settings": asdict(settings), "batch_sizes": list(settings.batch_sizes), "val_loss": val_loss,
            "val_loss_calibrated": calibrated,
            "ghost": {"batch_size": largest, "ghost_batch_size": GHOST, "val_loss": [r.val_loss for r in ghosts],
                      "val_loss_calibrated": [_calibrated_loss(r, x_calibration, data) for r in ghosts]}}


def _calibrated_loss(result: Any, x: Any, data: LabData) -> float:
    if result.diverged_at is not None:
        return math.nan
    model = result.model
    calibrate_batchnorm(model, x)
    return evaluate(model, *data.splits.val)


def means(rows: list[list[float]]) -> list[float]:
    """Mean over seeds per batch size (+Inf where a run diverged)."""
    return [statistics.fmean(loss_or_inf(v) for v in seeds) for seeds in rows]


def small_batch_gap(rows: list[list[float]]) -> float:
    """Mean val loss at the smallest batch size minus the best mean over batch sizes."""
    values = means(rows)
    return values[0] - min(values)


def seed_std(measurements: dict[str, Any]) -> float:
    """Pooled seed std over every norm and batch size (finite runs; NaN with a single seed)."""
    return pooled_std([seeds for rows in measurements["val_loss"].values() for seeds in rows])


def gaps(measurements: dict[str, Any]) -> dict[str, float]:
    """The small-batch gap of every norm, and "per-example": the mean of LayerNorm's and GroupNorm's."""
    result = {norm: small_batch_gap(rows) for norm, rows in measurements["val_loss"].items()}
    result["per-example"] = statistics.fmean(result[norm] for norm in PER_EXAMPLE)
    return result


def check(measurements: dict[str, Any]) -> Verdict:
    """Apply the rule of `CLAIM`."""
    gap = gaps(measurements)
    narrowing = gap["batch"] - gap["batchrenorm"]
    excess = gap["batch"] - gap["per-example"]
    seeds = len(measurements["val_loss"]["batch"][0])
    standard_error = seed_std(measurements) * math.sqrt(4 / seeds)
    return Verdict((
        Check("Batch Renorm's gap is smaller than BatchNorm's beyond seed noise", narrowing > K * standard_error,
              f"small-batch gap {gap['batchrenorm']:.4f} (Batch Renorm) vs {gap['batch']:.4f} (BatchNorm): "
              f"{narrowing:+.4f} vs {K:g} x standard error {standard_error:.4f}"),
        Check(f"Batch Renorm removes at least {HALF:.0%} of BatchNorm's excess over the per-example norms",
              narrowing >= HALF * excess,
              f"removes {narrowing:+.4f} of {excess:+.4f} (BatchNorm's gap minus the per-example norms' "
              f"{gap['per-example']:.4f})"),
    ))


def ghost_split(measurements: dict[str, Any]) -> tuple[float, float] | None:
    """BatchNorm's loss difference between the smallest and the largest batch, split into (noisy statistics, the
    small batch itself) by the ghost-batch runs (None without them)."""
    ghost = measurements["ghost"]["val_loss"]
    if not ghost:
        return None
    batch = means(measurements["val_loss"]["batch"])
    ghost_mean = statistics.fmean(loss_or_inf(v) for v in ghost)
    return ghost_mean - batch[-1], batch[0] - ghost_mean


def draw(measurements: dict[str, Any]) -> dict[str, Any]:
    """Val loss against the batch size, a line per norm (running statistics; dashed: calibrated); the ghost run."""
    from normlab.diagnostics.figures import new_grid

    figure, axes = new_grid(1, 1, 9.0, 5.5)
    axis = axes[0][0]
    sizes = measurements["batch_sizes"]
    colors = {"batch": "tab:red", "batchrenorm": "tab:blue", "layer": "tab:green", "group": "tab:olive"}
    names = {"batch": "BatchNorm", "batchrenorm": "Batch Renorm", "layer": "LayerNorm", "group": "GroupNorm"}
    for norm, rows in measurements["val_loss"].items():
        axis.semilogx(sizes, means(rows), "o-", base=2, color=colors.get(norm), label=names.get(norm, norm))
        for size, seeds in zip(sizes, rows):
            axis.plot([size] * len(seeds), seeds, ".", color=colors.get(norm), alpha=0.4)
    for norm, rows in measurements["val_loss_calibrated"].items():
        axis.semilogx(sizes, means(rows), "--", base=2, color=colors.get(norm), alpha=0.7,
                      label=f"{names.get(norm, norm)}, calibrated statistics")
    ghost = measurements["ghost"]
    if ghost["val_loss"]:
        axis.plot([ghost["batch_size"]], [statistics.fmean(loss_or_inf(v) for v in ghost["val_loss"])], "*",
                  markersize=14, color="tab:purple",
                  label=f"GhostBatchNorm: ghost batches of {ghost['ghost_batch_size']} in batches of "
                        f"{ghost['batch_size']}")
    axis.set(title="final val loss (eval mode) against the batch size, same number of steps", xlabel="batch size",
             ylabel="loss", xticks=sizes, xticklabels=[str(s) for s in sizes])
    axis.legend(fontsize="small")
    return {"small_batch": figure}


def table(measurements: dict[str, Any]) -> list[str]:
    """Mean val loss per batch size and norm, each norm's gap; how much of BatchNorm's excess Batch Renorm removes;
    the ghost split."""
    losses, calibrated = measurements["val_loss"], measurements["val_loss_calibrated"]
    columns = [(norm, losses[norm]) for norm in losses] + [(f"{norm} calibrated", calibrated[norm])
                                                             for norm in calibrated]
    rows = [[str(size)] + [number(means(values)[i], ".4f") for _, values in columns]
            for i, size in enumerate(measurements["batch_sizes"])]
    rows.append(["small-batch gap"] + [number(small_batch_gap(values), ".4f") for _, values in columns])
    lines = markdown_table(["batch size"] + [name for name, _ in columns], rows)
    gap = gaps(measurements)
    excess = gap["batch"] - gap["per-example"]
    share = (gap["batch"] - gap["batchrenorm"]) / excess if excess > 0 else float("nan")
    shift = max((abs(a - b) for norm in calibrated for rows_a, rows_b in zip(calibrated[norm], losses[norm])
                 for a, b in zip(means([rows_a]), means([rows_b]))), default=float("nan"))
    lines += ["", f"Pooled seed std: {number(seed_std(measurements), '.4f')}. BatchNorm's gap exceeds the "
                  f"per-example norms' by {number(excess, '.4f')}; Batch Renorm removes {number(share, '.0%')} of "
                  f"that excess. Calibrated population statistics move a batch norm's mean val loss by at most "
                  f"{number(shift, '.4f')}" + (": BatchNorm's gap is not in its running statistics but in what it "
                                               "learned." if shift < 0.1 * gap["batch"] else ".")]
    split = ghost_split(measurements)
    if split is not None:
        ghost = measurements["ghost"]
        smallest, largest, size = measurements["batch_sizes"][0], ghost["batch_size"], ghost["ghost_batch_size"]
        running = statistics.fmean(map(loss_or_inf, ghost["val_loss"]))
        calibrated_ghost = statistics.fmean(map(loss_or_inf, ghost["val_loss_calibrated"]))
        lines += ["", f"GhostBatchNorm, ghost batches of {size} in batches of {largest}: val loss "
                      f"{number(running, '.4f')} (calibrated {number(calibrated_ghost, '.4f')}). Of BatchNorm's loss "
                      f"difference between batch {smallest} and {largest}, {number(split[0], '+.4f')} comes with "
                      f"the statistics of {size} examples (ghost minus BatchNorm at {largest}) and "
                      f"{number(split[1], '+.4f')} with the small batch itself, its noisier gradients and fewer "
                      f"examples seen (BatchNorm at {smallest} minus ghost)."]
    return lines


EXPERIMENT = Experiment("small-batch", "BatchNorm, Batch Renorm, GhostBatchNorm and per-example norms at small "
                                       "batches", CLAIM, SETTINGS, budget, measure, check, draw, table)
