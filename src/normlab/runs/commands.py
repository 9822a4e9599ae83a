"""What the commands do, as functions on run directories: train, resume, evaluate, calibrate, sample, report.

The CLI parses arguments, calls one of these and prints what it returns; everything here works from Python.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from normlab.config import RunConfig
from normlab.data import Splits, Vocab, build_dataset, bundled_path, file_sha256, load_words, make_splits, random_batch
from normlab.errors import CheckpointError, DataError, TrainingDiverged
from normlab.model import build_model
from normlab.runs import ranks
from normlab.runs.rundir import DIAGNOSTICS, RunDir, read_metrics
from normlab.sample import Diversity, Samples, diversity, sample_words
from normlab.training import LoopEvents, calibrate_batchnorm, choose_engine, create_engine, evaluate, train_loop
from normlab.training.threads import threads_for, torch_threads, work_per_step


def load_data(config: RunConfig, vocab: Vocab | None = None) -> tuple[Vocab, Splits]:
    """Read the run's words and split them; with `vocab`, every character must be in it."""
    path = config.data.path
    words = load_words(path)
    if vocab is None:
        vocab = Vocab.from_words(words)
    else:
        vocab.check_words(words, source=str(path or bundled_path()))
    return vocab, make_splits(words, vocab, config.model.block_size, config.data.split_seed)


def load_new_run_data(config: RunConfig) -> tuple[Vocab, Splits]:
    """`load_data` for a run about to be created: `config.data` then records the words file by its full path
    and its sha256, which resuming checks."""
    if config.data.path is not None:
        config.data.path = str(Path(config.data.path).resolve())
    vocab, splits = load_data(config)  # a clear DataError for a missing or bad file, before it is hashed
    config.data.sha256 = file_sha256(config.data.path or bundled_path())
    return vocab, splits


@dataclass
class TrainOutcome:
    """What a finished training run reports."""

    run: RunDir
    final: dict[str, float]
    engine: str
    calibration: dict[str, float] | None = None
    report: Path | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class TrainOptions:
    """How to train, beside the run's config: diagnostics every `every` steps, BatchNorm calibration at the end,
    a progress bar, and torch threads (None: one for lesson-sized work, see `normlab.training.threads`)."""

    diagnose: bool = False
    every: int = 100
    calibrate: bool = False
    progress: bool = True
    threads: int | None = None


def start_training(config: RunConfig, out: str | Path, **options: Any) -> TrainOutcome:
    """Create the run directory `out` for `config`, train, and write the final losses (and report). `options`:
    the fields of `TrainOptions`."""
    options_ = TrainOptions(**options)
    config.validate()
    choose_engine(config.model, config.train)  # a ConfigError before anything is written
    vocab, splits = load_new_run_data(config)
    run = ranks.on_main(lambda: RunDir.create(out, config, vocab), lambda: RunDir(Path(out), config, vocab))
    return _train_and_finish(run, splits, None, 0, options_)


def resume_training(out: str | Path, **options: Any) -> TrainOutcome:
    """Continue the run in `out` from its last checkpoint to the configured number of steps. `options`: the
    fields of `TrainOptions`."""
    options_ = TrainOptions(**options)
    run = RunDir.open(out)
    _check_same_data(run)
    _, splits = load_data(run.config, run.vocab)
    state, step = run.load_state()
    if step >= run.config.train.steps:
        raise CheckpointError(f"{run.path} already finished its {run.config.train.steps} steps; nothing to resume")
    optimizer_state = run.load_optimizer_state(step)
    ranks.on_main(lambda: run.keep_metrics_until(step), lambda: None)
    return _train_and_finish(run, splits, (state, optimizer_state), step, options_)


def _check_same_data(run: RunDir) -> None:
    data = run.config.data
    path = Path(data.path) if data.path else bundled_path()
    if not path.is_file():
        raise DataError(f"the run's words file {path} no longer exists: restore it to resume {run.path}")
    if data.sha256 and file_sha256(path) != data.sha256:
        raise DataError(f"the words file {path} changed since {run.path} was created (sha256 differs): restore "
                        "the original file to resume this run, or start a new run")


def _train_and_finish(run: RunDir, splits: Splits, saved: tuple[dict, dict] | None, start_step: int,
                      options: TrainOptions) -> TrainOutcome:
    config = run.config
    main = ranks.is_main()  # of several processes (normlab.runs.ranks), rank 0 alone writes
    threads = options.threads or threads_for(work_per_step([config.model], config.train.batch_size))
    with torch_threads(threads):
        engine = create_engine([config.model], [config.train], len(run.vocab), splits.train,
                               states=None if saved is None else [saved[0]],
                               optimizer_states=None if saved is None else [saved[1]], step=start_step)
        if options.diagnose:
            engine.attach_monitors(options.every)

        def checkpoint(step: int) -> None:
            if main:
                run.save_checkpoint(engine.model_state(0), engine.optimizer_state(0), step)
            if engine.monitors:  # on every rank: the statistics are reduced over all of them; rank 0 writes
                engine.monitors[0].save(run.path)

        events = LoopEvents(log=(lambda _, row: run.append_metrics(row)) if main else None, checkpoint=checkpoint)
        try:
            diverged = train_loop(engine, [config.train], splits.train, splits.val, start_step=start_step,
                                  events=events, progress=options.progress and main)
        finally:
            engine.close()
        if diverged:
            raise TrainingDiverged(diverged[0].message(config.train), diverged[0].step)
        model = engine.modules()[0]
        outcome = TrainOutcome(run, final={}, engine=choose_engine(config.model, config.train))
        if not main:  # rank 0 measures and reports
            outcome.final = dict.fromkeys(("train", "val", "test"), math.nan)
            return outcome
        if options.calibrate:
            outcome.calibration = _calibrate(run, model, splits)
        outcome.final = record_final_losses(run, model, splits)
    if options.diagnose:
        outcome.report = write_report(run.path)
    return outcome


def record_final_losses(run: RunDir, model: torch.nn.Module | None, splits: Splits,
                        measured: dict[str, float] | None = None) -> dict[str, float]:
    """The full-split losses of `model` (NaN each for a diverged run, `model` None), appended to the run's metrics
    as its "final" row. `measured`: full-split losses already computed (e.g. by the sweep runner), not redone."""
    measured = measured or {}
    final = {split: measured[split] if split in measured else math.nan if model is None
             else evaluate(model, *splits.get(split)) for split in ("train", "val", "test")}
    run.append_metrics({"event": "final", "step": run.config.train.steps, **final})
    return final


def write_report(run_path: str | Path, *, tensorboard: bool = False) -> Path:
    """Rebuild `report.html` of a run from its stored diagnostics and metrics (and, with `tensorboard`, export
    them to `RUN/tensorboard/` for `tensorboard --logdir RUN`)."""
    from normlab.diagnostics import export_tensorboard, load_diagnostics
    from normlab.diagnostics import write_report as write

    run = RunDir.open(run_path)
    if tensorboard:
        if not (run.path / DIAGNOSTICS).is_dir():
            raise CheckpointError(f"{run.path} has no diagnostics to export: train it with --diagnose")
        export_tensorboard(load_diagnostics(run.path), run.path / "tensorboard", metrics_rows=read_metrics(run.path))
    return write(run.path)


@dataclass
class Inspection:
    """One forward and backward pass of a preset at initialisation."""

    table: str
    findings: list[Any]
    initial_loss: float
    uniform_loss: float


def inspect_preset(config: RunConfig, batch_size: int = 256) -> Inspection:
    """Build `config`'s model, run one training-mode forward and backward pass on a batch of training examples
    (no update) and return the per-layer table and the findings."""
    from normlab.diagnostics import find_issues, format_layer_table, inspect_model

    vocab, splits = load_data(config)
    model = build_model(config.model, len(vocab), seed=config.train.seed)
    x, y = random_batch(splits.train, batch_size, config.train.seed)
    diagnostics = inspect_model(model, x, y)
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(x), y).item()
    return Inspection(format_layer_table(diagnostics), find_issues(diagnostics, vocab_size=len(vocab)), loss,
                      math.log(len(vocab)))


def _calibrate(run: RunDir, model: torch.nn.Module, splits: Splits) -> dict[str, float]:
    before = evaluate(model, *splits.val)
    layers = calibrate_batchnorm(model, splits.train[0])
    after = evaluate(model, *splits.val)
    run.save_model(model.state_dict(), run.model_step(), calibrated="true")
    result = {"layers": layers, "val_before": before, "val_after": after}
    run.append_metrics({"event": "calibrate", **result})
    return result


def calibrate_run(run_path: str | Path) -> dict[str, float]:
    """Recompute the population statistics of every BatchNorm of a run; val loss before and after."""
    run = RunDir.open(run_path)
    _, splits = load_data(run.config, run.vocab)
    model, _ = run.load_model()
    if not any("BatchNorm" in type(module).__name__ for module in model.modules()):
        raise CheckpointError(f"{run.path} has no BatchNorm layer to calibrate (model.norm={run.config.model.norm})")
    return _calibrate(run, model, splits)


def evaluate_run(run_path: str | Path, split: str = "val", data: str | Path | None = None) -> tuple[float, int]:
    """Loss of a run on one of its splits, or on every word of another file; returns (loss, examples)."""
    run = RunDir.open(run_path)
    model, _ = run.load_model()
    if data is not None:
        words = load_words(data)
        run.vocab.check_words(words, source=str(data))
        x, y = build_dataset(words, run.vocab, run.config.model.block_size)
    else:
        _, splits = load_data(run.config, run.vocab)
        x, y = splits.get(split)
    if len(x) == 0:
        raise DataError(f"the {split} split of {run.path} is empty: the word list is too short to split 80/10/10")
    return evaluate(model, x, y), len(x)


def sample_run(run_path: str | Path, n: int = 20, *, temperature: float = 1.0, top_k: int | None = None,
               seed: int = 0) -> tuple[Samples, Diversity]:
    """Sample `n` words from a run and measure their diversity against its training words."""
    run = RunDir.open(run_path)
    model, _ = run.load_model()
    _, splits = load_data(run.config, run.vocab)
    samples = sample_words(model, run.vocab, n, temperature=temperature, top_k=top_k, seed=seed)
    return samples, diversity(samples, splits.train_words)
