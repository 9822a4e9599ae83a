"""A grid of configurations trained at once, each into its own run directory: `normlab sweep`.

The configurations (a preset, times every combination of the `--vary` values) go through the sweep runner, so
those that share an architecture train in lockstep on the stacked engine. Each lands in `OUT/<name>/` as a
complete run directory (config, vocabulary, weights, metrics with full-split losses at the end, and with
`diagnose`, diagnostics recorded by a Monitor during training, as `normlab train --diagnose` records them, and
a report), which `normlab sample`, `eval` and `report` read like any other run.
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
from normlab.runs.commands import load_new_run_data, record_final_losses
from normlab.runs.rundir import RunDir
from normlab.sweeps.runner import SweepResult, SweepRun, run_sweep


@dataclass
class GridRun:
    """One configuration of the grid and where it landed."""

    name: str
    config: RunConfig
    path: Path
    final: dict[str, float]
    diverged_at: int | None


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


def grid_configs(base: RunConfig, variations: dict[str, list[str]]) -> list[tuple[str, RunConfig]]:
    """Every combination of the variations applied to a copy of `base`, with a directory-safe name each."""
    combos = itertools.product(*[[(key, value) for value in values] for key, values in variations.items()])
    configs = []
    for combo in combos:
        config = RunConfig.from_dict(base.to_dict())
        for key, value in combo:
            apply_override(config, f"{key}={value}")
        config.validate()
        name = "_".join(f"{key.split('.')[-1]}-{value}" for key, value in combo) or "base"
        configs.append((re.sub(r"[^A-Za-z0-9_.+-]", "-", name), config))
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
    configs = grid_configs(base, variations)
    runs: list[GridRun] = []
    for block_size in sorted({config.model.block_size for _, config in configs}):  # one dataset per block size
        group = [(name, config) for name, config in configs if config.model.block_size == block_size]
        runs += _train_group(group, out, diagnose, every, progress, backend)
    order = {name: index for index, (name, _) in enumerate(configs)}
    return sorted(runs, key=lambda run: order[run.name])


def _train_group(group: list[tuple[str, RunConfig]], out: Path, diagnose: bool, every: int | None,
                 progress: bool, backend: Any) -> list[GridRun]:
    first = group[0][1]
    vocab, splits = load_new_run_data(first)  # the configurations of a grid share their data
    if diagnose and every is None:
        every = max(1, min(config.train.steps for _, config in group) // 10)
    runs = [SweepRun(name, config.model, config.train) for name, config in group]
    results = run_sweep(runs, splits, len(vocab), progress=progress, keep_models=True,
                        diagnose_every=every if diagnose else None, backend=backend)
    landed = []
    for (name, config), result in zip(group, results):
        config.data = dataclasses.replace(config.data, path=first.data.path, sha256=first.data.sha256)
        landed.append(_write_run(out / name, name, config, vocab, splits, result))
    return landed


def _write_run(path: Path, name: str, config: RunConfig, vocab: Vocab, splits: Splits,
               result: SweepResult) -> GridRun:
    run = RunDir.create(path, config, vocab)
    model = None if result.diverged_at is not None else result.model
    if model is not None:  # a diverged run keeps no weights: they are not finite
        run.save_model(result.state, config.train.steps)
    for row in result.rows:
        run.append_metrics(row)
    if result.diverged_at is not None:
        run.append_metrics({"event": "diverged", "step": result.diverged_at})
    final = record_final_losses(run, model, splits,
                                {"train": result.train_loss, "val": result.val_loss})  # the runner's, full splits
    if result.diagnostics is not None:
        from normlab.diagnostics import save_diagnostics, write_report

        save_diagnostics(result.diagnostics, run.path)
        write_report(run.path)
    return GridRun(name, config, run.path, final, result.diverged_at)
