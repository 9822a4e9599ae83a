"""A grid of configurations trained at once, each into its own run directory: `normlab sweep`.

The configurations (a preset, times every combination of the `--vary` values) go through the sweep runner, so
those that share an architecture train in lockstep on the stacked engine. Each lands in `OUT/<name>/` as a
complete run directory (config, vocabulary, weights, metrics with full-split losses at the end, and with
`diagnose`, diagnostics recorded by a Monitor during training, as `normlab train --diagnose` records them, and
a report), which `normlab sample`, `eval` and `report` read like any other run. `OUT/summary.csv` and
`OUT/summary.json` list every run's final losses (see `normlab.sweeps.summary`); `normlab report OUT` draws them.

Everything is checked before training starts (each configuration, the data, the memory, that `OUT` can be
created); sweep runs keep no optimizer state, so they cannot be resumed.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normlab.config import RunConfig, apply_override
from normlab.data import Splits, Vocab
from normlab.errors import CheckpointError, ConfigError
from normlab.runs import preflight
from normlab.runs.commands import load_new_run_data, record_final_losses
from normlab.runs.rundir import RunDir
from normlab.sweeps.runner import SweepResult, SweepRun, run_sweep
from normlab.sweeps.summary import SweepRow, write_summary


@dataclass
class GridRun:
    """One configuration of the grid and where it landed."""

    name: str
    config: RunConfig
    path: Path
    final: dict[str, float]
    diverged_at: int | None
    values: dict[str, str] = dataclasses.field(default_factory=dict)


def parse_variations(items: list[str]) -> dict[str, list[str]]:
    """`key=v1,v2,...` items → {key: [v1, v2, ...]}; `ConfigError` for a malformed or repeated key."""
    variations: dict[str, list[str]] = {}
    for item in items:
        key, _, values = item.partition("=")
        key = key.strip()
        if not key or not values or any(not v.strip() for v in values.split(",")):
            raise ConfigError(f"--vary {item!r}: expected key=value1,value2,..., e.g. --vary lr=0.05,0.1,0.2")
        if key in variations:
            raise ConfigError(f"--vary {key} is given twice: list all its values in one --vary")
        if key.split(".")[-1] in ("path", "split_seed", "sha256"):
            raise ConfigError(f"--vary {key}: the configurations of a grid share their data; use --data instead")
        values = [v.strip() for v in values.split(",")]
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise ConfigError(f"--vary {key} lists {', '.join(repeated)} more than once: give each value once")
        variations[key] = values
    return variations


def grid_combinations(variations: dict[str, list[str]]) -> list[dict[str, str]]:
    """Every combination of the variations, as {key: value}, in grid order."""
    return [dict(combo) for combo in itertools.product(*[[(key, value) for value in values]
                                                          for key, values in variations.items()])]


def grid_configs(base: RunConfig, variations: dict[str, list[str]]) -> list[tuple[str, RunConfig]]:
    """Every combination of the variations applied to a copy of `base`, with a directory-safe name each."""
    configs = []
    for combo in grid_combinations(variations):
        config = RunConfig.from_dict(base.to_dict())
        for key, value in combo.items():
            apply_override(config, f"{key}={value}")
        config.validate()
        preflight.check_settings_take_effect(config, [preflight.canonical_key(key) for key in combo])
        name = "_".join(f"{key.split('.')[-1]}-{value}" for key, value in combo.items()) or "base"
        configs.append((re.sub(r"[^A-Za-z0-9_.+-]", "-", name), config))
    names = [name for name, _ in configs]
    if len(set(names)) < len(names):
        raise ConfigError("two configurations of the grid get the same folder name: vary keys whose last parts "
                          "differ (e.g. not model.x and train.x), or values that differ in letters or digits")
    return configs


def train_grid(base: RunConfig, variations: dict[str, list[str]], out: str | Path, *, diagnose: bool = False,
               every: int | None = None, progress: bool = True, backend: Any = None) -> list[GridRun]:
    """Train every configuration of the grid into `out/<name>/`; returns them in grid order.

    `diagnose` records diagnostics every `every` steps (default: about ten recordings a run). `backend`: where
    the lockstep groups train (`normlab.sweeps.backends`; None: local processes).
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out} already exists and is not empty: choose another --out")
    if every is not None and every < 1:
        raise ConfigError(f"--every must be at least 1 (steps between diagnostic recordings), got {every}")
    configs = grid_configs(base, variations)
    datasets = {}
    for block_size in sorted({config.model.block_size for _, config in configs}):  # one dataset per block size
        group = [(name, config) for name, config in configs if config.model.block_size == block_size]
        datasets[block_size] = load_new_run_data(group[0][1])  # the configurations of a grid share their data
        for _, config in group:
            preflight.check_trainable(config, datasets[block_size][1])
            preflight.check_memory(config, len(datasets[block_size][0]))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CheckpointError(f"cannot create {out} ({error.strerror or error}): choose another --out") from None
    runs: list[GridRun] = []
    for block_size, data in datasets.items():
        group = [(name, config) for name, config in configs if config.model.block_size == block_size]
        runs += _train_group(group, data, out, diagnose, every, progress, backend)
    order = {name: index for index, (name, _) in enumerate(configs)}
    runs.sort(key=lambda run: order[run.name])
    for run, combo in zip(runs, grid_combinations(variations)):
        run.values = combo
    write_summary(out, base.preset, variations, [SweepRow(r.name, r.values, r.final, r.diverged_at) for r in runs])
    return runs


def _train_group(group: list[tuple[str, RunConfig]], data: tuple[Vocab, Splits], out: Path, diagnose: bool,
                 every: int | None, progress: bool, backend: Any) -> list[GridRun]:
    first = group[0][1]
    vocab, splits = data
    if diagnose and every is None:
        every = max(1, min(config.train.steps for _, config in group) // 10)
    runs = [SweepRun(name, config.model, config.train.resolved()) for name, config in group]
    results = run_sweep(runs, splits, len(vocab), progress=progress, keep_models=True,
                        diagnose_every=every if diagnose else None, backend=backend)
    landed = []
    for (name, config), result in zip(group, results):
        config.data = dataclasses.replace(config.data, path=first.data.path, sha256=first.data.sha256)
        landed.append(_write_run(out / name, name, config, vocab, splits, result))
    return landed


def _write_run(path: Path, name: str, config: RunConfig, vocab: Vocab, splits: Splits,
               result: SweepResult) -> GridRun:
    with RunDir.create(path, config, vocab) as run:
        model = None if result.diverged_at is not None else result.model
        for row in result.rows:
            run.append_metrics(row)
        if model is not None:  # a diverged run keeps no weights: they are not finite
            run.save_model(result.state, config.train.steps)
        if result.diverged_at is not None:
            run.append_metrics({"event": "diverged", "step": result.diverged_at})
        final = record_final_losses(run, model, splits,
                                    {"train": result.train_loss, "val": result.val_loss})  # the runner's, full splits
    if result.diagnostics is not None:
        from normlab.diagnostics import save_diagnostics, write_report

        save_diagnostics(result.diagnostics, run.path)
        write_report(run.path)
    return GridRun(name, config, run.path, final, result.diverged_at)
