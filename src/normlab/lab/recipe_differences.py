"""recipe-differences: why your numbers differ from the lesson's. The lesson's recipe, then one factor changed at a
time, each on several seeds; which factors move the final val loss beyond seed-to-seed noise.

The recipe is `lesson-kaiming` (one hidden layer of 200, Kaiming init, no norm) with the lesson's SGD: learning rate
0.1, x0.1 at half the steps, batch 32, a budget of `Settings.steps` steps (the lesson trained 200,000). Each level
below changes one thing; every level trains on the seeds 0..n-1 (a seed sets the initial weights and the batches),
except the "seed" level, which is the recipe on the fresh seeds n..2n-1:

    seed            other seeds
    schedule        cosine (to 0), constant
    learning rate   0.05, 0.2 (the lesson's 0.1 was not tuned)
    steps           half, double (the step decay stays at half of each run)
    batch size      16, 64 (same number of steps)
    width           n_hidden 100, 300
    init            naive N(0,1) hidden and output weights (lesson-original), hand-tuned x0.2 (lesson-tanh-fix)

The half-steps level is the weights after half the steps of a run whose decay comes at a quarter: a run's learning
rate and batches depend only on the step, so they are exactly what a run of half the steps computes, and it trains
in lockstep with the recipe. Levels that keep the steps and batch size train in lockstep with the recipe; the
others in groups of their own.

Rule: seed noise is the recipe's own seed-to-seed std s, pooled over its two sets of seeds (the recipe and the
"seed" level: 2n runs of one configuration, 2n - 2 degrees of freedom), and a level's mean moves beyond it when
|mean - recipe mean| > K·s·√(1/n_level + 1/n_recipe), K = 3 (a t statistic beyond 3: about a 2% false alarm per
level with 6 degrees of freedom, for normal noise); a diverged run moves its level beyond it. The levels' own
spreads do not enter: an unstable level (the naive init) would otherwise widen the noise of every comparison.

Budget (9 levels in lockstep with the recipe, 5 in groups of their own): tiny 2 seeds x 200 steps; quick 3 seeds x
3,000 steps (about 5 s on a quiet 2-core machine); full 4 seeds x 5,000 steps (the lockstep groups of 18
stay below the engine's compilation threshold) (quiet 2-core time: the README's lab table).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from normlab.config import get_preset
from normlab.lab.common import (
    Check,
    Experiment,
    LabData,
    Verdict,
    loss_or_inf,
    markdown_table,
    number,
    pooled_std,
    train_config,
)
from normlab.sweeps.runner import SweepRun, run_sweep
from normlab.training import evaluate
from normlab.training.engines import lockstep_key

K = 3.0  # a level moves the val loss beyond seed noise past K standard errors of the difference of means
RECIPE, SEED = "recipe", "seed"
OFF_SCALE = 0.3  # the figure's loss axis ends this far above the recipe's mean


@dataclass(frozen=True)
class Level:
    """One change to the recipe: its factor, a label, the model and train fields it changes."""

    factor: str
    label: str
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    steps: float = 1.0  # steps as a multiple of the recipe's
    half: bool = False  # the half-steps level, taken from a snapshot (see the module notes)


LEVELS = (
    Level(RECIPE, "lesson-kaiming"),
    Level(SEED, "other seeds"),
    Level("schedule", "cosine", train={"schedule": "cosine"}),
    Level("schedule", "constant", train={"schedule": "constant"}),
    Level("learning rate", "lr 0.05", train={"lr": 0.05}),
    Level("learning rate", "lr 0.2", train={"lr": 0.2}),
    Level("steps", "half the steps", half=True),
    Level("steps", "double the steps", steps=2.0),
    Level("batch size", "batch 16", train={"batch_size": 16}),
    Level("batch size", "batch 64", train={"batch_size": 64}),
    Level("width", "n_hidden 100", model={"n_hidden": 100}),
    Level("width", "n_hidden 300", model={"n_hidden": 300}),
    Level("init", "naive N(0,1)", model={"preset": "lesson-original"}),
    Level("init", "x0.2 (tanh-fix)", model={"preset": "lesson-tanh-fix"}),
)
FACTORS = tuple(dict.fromkeys(level.factor for level in LEVELS if level.factor != RECIPE))

CLAIM = ("Your numbers differ from the lesson's for more reasons than the seed: changing one factor of the recipe at "
         "a time, a fresh set of seeds moves the mean final val loss by no more than seed noise allows, and each "
         "other factor (" + ", ".join(FACTORS[1:]) + ") moves it beyond seed noise at one of its levels at least: "
         f"|mean - recipe mean| > {K:g} x the recipe's seed std (pooled over both sets of seeds) x "
         "√(1/n_level + 1/n_recipe), or a diverged run.")


@dataclass(frozen=True)
class Settings:
    """Steps of the recipe, seeds per level, and the largest lockstep group."""

    steps: int
    seeds: int
    group_size: int


SETTINGS = {"tiny": Settings(200, 2, 18), "quick": Settings(3_000, 3, 14), "full": Settings(5_000, 4, 18)}


def budget(settings: Settings) -> str:
    """Levels x seeds, steps."""
    return (f"{len(LEVELS)} configurations (the recipe and {len(LEVELS) - 1} levels) x {settings.seeds} seeds = "
            f"{len(LEVELS) * settings.seeds} runs of {settings.steps:,} steps (half and double for the steps levels)")


def sweep_run(level: Level, seed: int, steps: int) -> SweepRun:
    """The run of `level` on `seed` for a recipe of `steps` steps. Levels that cannot train in lockstep with the
    recipe train uncompiled: their groups of a few runs are near the engine's compilation threshold, where
    compiling costs about what it saves, and a cold compilation cache would add ~20 s per group."""
    overrides = dict(level.model)
    base = get_preset(overrides.pop("preset", "lesson-kaiming")).model
    model = replace(base, **overrides)
    train = dict(level.train)
    if level.half:
        train["lr_decay_step"] = steps // 4
    config = train_config(round(steps * level.steps), seed=seed, **train)
    if lockstep_key(model, config) != lockstep_key(get_preset("lesson-kaiming").model, train_config(steps)):
        config = replace(config, compile=False)
    return SweepRun(f"{level.label} seed {seed}", model, config)


def seeds_of(level: Level, settings: Settings) -> range:
    """The recipe's seeds, or the fresh ones for the seed level."""
    return range(settings.seeds, 2 * settings.seeds) if level.factor == SEED else range(settings.seeds)


def measure(settings: Settings, data: LabData, progress: bool) -> dict[str, Any]:
    """Final val loss (whole val split) of every level and seed."""
    plan = [(level, sweep_run(level, seed, settings.steps)) for level in LEVELS for seed in seeds_of(level, settings)]
    half = settings.steps // 2
    results = run_sweep([run for _, run in plan], data.splits, len(data.vocab), progress=progress,
                        snapshot_steps=[half], final_examples=data.val_examples, group_size=settings.group_size)
    losses: dict[str, list[float]] = {level.label: [] for level in LEVELS}
    for (level, _), result in zip(plan, results):
        loss = evaluate(result.snapshot(half), *data.splits.val) if level.half else result.val_loss
        losses[level.label].append(loss)
    return {"settings": asdict(settings), "levels": [{"factor": level.factor, "label": level.label}
                                                     for level in LEVELS], "val_loss": losses}


def seed_noise(measurements: dict[str, Any]) -> float:
    """The recipe's seed-to-seed std, pooled over its two sets of seeds (the recipe and the seed level)."""
    return pooled_std([measurements["val_loss"][level["label"]] for level in measurements["levels"]
                       if level["factor"] in (RECIPE, SEED)])


def comparisons(measurements: dict[str, Any]) -> list[dict[str, Any]]:
    """Per level (the recipe excluded): its factor, mean, difference from the recipe's mean, threshold, and
    whether it moves the val loss beyond seed noise."""
    losses = measurements["val_loss"]
    noise = seed_noise(measurements)
    recipe = [loss_or_inf(v) for v in losses[measurements["levels"][0]["label"]]]
    rows = []
    for level in measurements["levels"][1:]:
        values = [loss_or_inf(v) for v in losses[level["label"]]]
        mean = statistics.fmean(values)
        difference = mean - statistics.fmean(recipe)
        threshold = K * noise * math.sqrt(1 / len(values) + 1 / len(recipe))
        beyond = math.isinf(mean) or abs(difference) > threshold  # NaN (no noise estimate) compares False
        rows.append({**level, "mean": mean, "difference": difference, "threshold": threshold, "beyond": beyond})
    return rows


def check(measurements: dict[str, Any]) -> Verdict:
    """Apply the rule of `CLAIM`: one check per factor."""
    rows = comparisons(measurements)
    checks = []
    for factor in dict.fromkeys(row["factor"] for row in rows):
        levels = [row for row in rows if row["factor"] == factor]
        measured = "; ".join(f"{row['label']} {row['difference']:+.4f} vs ±{row['threshold']:.4f}" for row in levels)
        if factor == SEED:
            checks.append(Check("a fresh set of seeds stays within seed noise", not any(r["beyond"] for r in levels),
                                measured))
        else:
            checks.append(Check(f"{factor} moves the val loss beyond seed noise", any(r["beyond"] for r in levels),
                                measured))
    return Verdict(tuple(checks))


def draw(measurements: dict[str, Any]) -> dict[str, Any]:
    """One row per level: every seed's val loss and the mean, against the recipe's mean and the noise band; means
    off the scale (more than `OFF_SCALE` above the recipe's, or diverged) are written at the right edge."""
    from normlab.diagnostics.figures import new_grid

    rows = comparisons(measurements)
    recipe_label = measurements["levels"][0]["label"]
    recipe = [loss_or_inf(v) for v in measurements["val_loss"][recipe_label]]
    recipe_mean = statistics.fmean(recipe)
    figure, axes = new_grid(1, 1, 10.0, 0.45 * len(rows) + 2.5)
    axis = axes[0][0]
    band = max((row["threshold"] for row in rows if row["factor"] == SEED), default=math.nan)
    if math.isfinite(band):
        axis.axvspan(recipe_mean - band, recipe_mean + band, color="tab:gray", alpha=0.25,
                     label=f"recipe mean ± seed noise ({K:g} standard errors)")
    axis.axvline(recipe_mean, color="tab:gray")
    labels = [f"recipe: {recipe_label}"]
    points = [(0, recipe, recipe_mean, "tab:gray")]
    for position, row in enumerate(rows, start=1):
        values = [loss_or_inf(v) for v in measurements["val_loss"][row["label"]]]
        points.append((position, values, row["mean"], "tab:red" if row["beyond"] else "tab:blue"))
        labels.append(f"{row['factor']}: {row['label']}")
    shown = [v for _, values, _, _ in points for v in values if v <= recipe_mean + OFF_SCALE]
    right = max(shown, default=recipe_mean) + 0.02
    for position, values, mean, color in points:
        near = [v for v in values if v <= right]
        axis.plot(near, [position] * len(near), "o", color=color, alpha=0.4)
        if mean <= right:
            axis.plot([mean], [position], "D", color=color, markersize=8)
        else:
            axis.plot([right], [position], ">", color=color, markersize=10)
            axis.annotate(f"mean {mean:.2f}" if math.isfinite(mean) else "diverged", (right, position),
                          xytext=(-12, 0), textcoords="offset points", ha="right", va="center", color=color)
    axis.plot([], [], "D", color="tab:red", label="mean beyond seed noise")
    axis.plot([], [], "D", color="tab:blue", label="mean within seed noise")
    axis.set(yticks=range(len(labels)), yticklabels=labels, xlabel="final val loss (dots: seeds)",
             title="one factor of the recipe changed at a time", xlim=(min(shown, default=recipe_mean) - 0.02, right))
    axis.invert_yaxis()
    figure.legend(fontsize="small", loc="outside upper center", ncol=3)
    return {"recipe_differences": figure}


def table(measurements: dict[str, Any]) -> list[str]:
    """Per level: mean ± std over seeds, difference from the recipe, the threshold, beyond or within."""
    losses = measurements["val_loss"]
    recipe_label = measurements["levels"][0]["label"]

    def spread(label: str) -> str:
        values = [loss_or_inf(v) for v in losses[label]]
        std = statistics.stdev(values) if len(values) > 1 and all(map(math.isfinite, values)) else math.nan
        return f"{number(statistics.fmean(values), '.4f')} ± {number(std, '.4f')}"

    rows = [["recipe", recipe_label, spread(recipe_label), "", "", ""]]
    rows += [[row["factor"], row["label"], spread(row["label"]), number(row["difference"], "+.4f"),
              number(row["threshold"], ".4f"), "beyond" if row["beyond"] else "within"]
             for row in comparisons(measurements)]
    return markdown_table(["factor", "level", "val loss mean ± std", "difference", "noise threshold", "seed noise"],
                          rows) + ["", f"Seed noise (the recipe's seed std over both sets of seeds): "
                                       f"{number(seed_noise(measurements), '.4f')}."]


EXPERIMENT = Experiment("recipe-differences", "why your numbers differ: one factor of the recipe at a time", CLAIM,
                        SETTINGS, budget, measure, check, draw, table)
