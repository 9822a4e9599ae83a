"""What the commands do, as functions on run directories: train, resume (and extend), evaluate, calibrate, sample,
report, export, inspect.

The CLI parses arguments, calls one of these and prints what it returns; everything here works from Python.
Everything that can be checked is checked before a run directory is created or changed (see `preflight`); the
commands that write a run (train, resume, calibrate) hold its lock while they do. In a distributed run
(`normlab.runs.ranks`), rank 0 alone creates, locks and writes the run directory; the other ranks read it.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from normlab.config import BATCH_NORMS, RunConfig
from normlab.data import Splits, Vocab, build_dataset, bundled_path, file_sha256, load_words, make_splits, random_batch
from normlab.errors import CheckpointError, ConfigError, DataError, NormlabError, NormlabWarning, TrainingDiverged
from normlab.model import build_model
from normlab.runs import preflight, ranks
from normlab.runs.rundir import RunDir
from normlab.sample import Diversity, Samples, diversity, sample_words
from normlab.training import LoopEvents, calibrate_batchnorm, choose_engine, create_engine, evaluate, train_loop
from normlab.training.threads import threads_for, torch_threads, work_per_step

# Diagnostic recordings in a run when --every is not given: enough for every plot, few enough that recording
# costs a small part of a compiled run (the lesson's 200,000 steps: every 1,000 steps).
RECORDINGS_PER_RUN = 200
COMPILING = ("compiling the training steps (once for this configuration, ~30 s; cached on disk afterwards, "
             "`normlab compile` prepares them ahead)")


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
    and its sha256, which later commands check."""
    if config.data.path is not None:
        config.data.path = str(Path(config.data.path).resolve())
    vocab, splits = load_data(config)  # a clear DataError for a missing or bad file, before it is hashed
    config.data.sha256 = file_sha256(config.data.path or bundled_path())
    return vocab, splits


def check_words_file(run: RunDir, *, strict: bool) -> None:
    """Compare the run's words file with the sha256 recorded at its creation. A difference is a `DataError`
    with `strict` (resuming must see the same data), else a `NormlabWarning` naming the file (eval, sample
    and calibrate go on, on what the file holds now)."""
    data = run.config.data
    path = Path(data.path) if data.path else bundled_path()
    if not path.is_file():
        if strict:
            raise DataError(f"the run's words file {path} no longer exists: restore it to resume {run.path}")
        return  # reading it fails with its own clear error
    if data.sha256 and file_sha256(path) != data.sha256:
        message = f"the words file {path} changed since {run.path} was created (its sha256 differs)"
        if strict:
            raise DataError(f"{message}: restore the original file to resume this run, or start a new run")
        warnings.warn(f"{message}: the splits, and so these numbers, are not those of training", NormlabWarning,
                      stacklevel=3)


@dataclass
class TrainOutcome:
    """What a finished training run reports."""

    run: RunDir
    final: dict[str, float]
    engine: str
    calibration: dict[str, Any] | None = None
    report: Path | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class TrainOptions:
    """How to train, beside the run's config: diagnostics every `every` steps (None: `RECORDINGS_PER_RUN`
    recordings spread over the run), BatchNorm calibration at the end,
    a progress bar, torch threads (None: one for lesson-sized work, see `normlab.training.threads`),
    `notice`, called with a line for the user before training starts (the engine that records diagnostics,
    a compilation about to take a while), and `tensorboard`, a folder where TensorBoard event files follow
    training as it runs (`tensorboard --logdir DIR`)."""

    diagnose: bool = False
    every: int | None = None
    calibrate: bool = False
    progress: bool = True
    threads: int | None = None
    notice: Callable[[str], None] | None = None
    tensorboard: str | Path | None = None  # stream the losses (and with `diagnose`, the diagnostics) there live

    def validate(self) -> None:
        """`ConfigError` for a value that cannot work."""
        if self.every is not None and self.every < 1:
            raise ConfigError(f"--every must be at least 1 (steps between diagnostic recordings), got {self.every}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be at least 1, got {self.threads}")
        if self.tensorboard is not None and Path(self.tensorboard).exists() and not Path(self.tensorboard).is_dir():
            raise ConfigError(f"--tensorboard {self.tensorboard} is a file: give a folder (created if missing)")


def has_batchnorm(config: RunConfig) -> bool:
    """Whether the model of `config` has a batch norm with running statistics (what `calibrate` recomputes)."""
    return config.model.norm in BATCH_NORMS or config.model.output_norm


def _check_before_training(config: RunConfig, splits: Splits, vocab: Vocab, options: TrainOptions) -> None:
    preflight.check_trainable(config, splits)
    preflight.check_memory(config, len(vocab))
    if options.calibrate and not has_batchnorm(config):
        raise ConfigError(f"--calibrate recomputes BatchNorm statistics, and this model has none "
                          f"(model.norm={config.model.norm}): drop --calibrate")


def start_training(config: RunConfig, out: str | Path, **options: Any) -> TrainOutcome:
    """Create the run directory `out` for `config`, train, and write the final losses (and report). `options`:
    the fields of `TrainOptions`. Everything is checked before `out` is created; if training fails before its
    first checkpoint for any reason but a user error, `out` is left as it was found."""
    options_ = TrainOptions(**options)
    options_.validate()
    config.validate()
    choose_engine(config.model, config.train)  # a ConfigError before anything is written
    vocab, splits = load_new_run_data(config)
    _check_before_training(config, splits, vocab, options_)
    with ranks.on_main(lambda: RunDir.create(out, config, vocab), lambda: RunDir(Path(out), config, vocab)) as run:
        try:
            return _train_and_finish(run, splits, None, 0, options_)
        except Exception as error:
            if not isinstance(error, NormlabError) and ranks.is_main() and run.checkpoint() is None:
                run.discard_new()
            raise


def resume_training(out: str | Path, *, steps: int | None = None, **options: Any) -> TrainOutcome:
    """Continue the run in `out` from its checkpoint to the configured number of steps, ending with exactly the
    weights an uninterrupted run would have. `steps` (more than the checkpoint's) changes the number of steps,
    e.g. to extend a finished run (see `extend_steps`). `options`: the fields of `TrainOptions`."""
    options_ = TrainOptions(**options)
    options_.validate()
    with ranks.on_main(lambda: RunDir.open(out, lock="resume"), lambda: RunDir.open(out)) as run:
        check_words_file(run, strict=True)
        saved, step = None, 0  # stopped before its first checkpoint: from the initial weights, a function of the seed
        if run.checkpoint() is not None:
            state, step = run.load_state(uncalibrated=True)  # what training left, whether calibrated since or not
        if steps is not None:
            extend_steps(run.config, step, steps)
        elif step >= run.config.train.steps:
            raise CheckpointError(f"{run.path} already finished its {run.config.train.steps} steps: to train it "
                                  f"further, give the new total, e.g. `normlab train --resume --set "
                                  f"steps={2 * run.config.train.steps} --out {run.path}`")
        _, splits = load_data(run.config, run.vocab)
        _check_before_training(run.config, splits, run.vocab, options_)
        if step > 0:
            saved = (state, run.load_optimizer_state(step))
        if ranks.is_main():
            if steps is not None:
                run.save_config()
            run.rewind_metrics()
        return _train_and_finish(run, splits, saved, step, options_)


def extend_steps(config: RunConfig, done: int, steps: int) -> None:
    """Set a run's number of steps to `steps`, more than the `done` of its checkpoint (for `config.json`).

    The schedule of the steps already trained is kept where it can be: the step schedule's decay step, when
    unset (half of the steps), is fixed at half of the *original* steps, so an extended run decays once, where
    it did. The cosine schedule's horizon becomes `steps`: the remaining steps follow the cosine of the new
    length, so the rate rises from where the original cosine had brought it. Unset evaluation and checkpoint
    intervals scale with the new length.
    """
    if steps <= done:
        raise ConfigError(f"--set steps={steps}: the run's checkpoint is at step {done}; give more steps than that")
    train = config.train
    if train.schedule == "step" and train.lr_decay_step is None:
        train.lr_decay_step = train.decay_step
    train.steps = steps
    config.validate()


def _train_and_finish(run: RunDir, splits: Splits, saved: tuple[dict, dict] | None, start_step: int,
                      options: TrainOptions) -> TrainOutcome:
    config = run.config
    main = ranks.is_main()  # of several processes, rank 0 alone writes and reports
    train = config.train.resolved()
    name = choose_engine(config.model, train)
    threads = options.threads or threads_for(work_per_step([config.model], train.batch_size))
    with torch_threads(threads):
        engine = create_engine([config.model], [train], len(run.vocab), splits.train,
                               states=None if saved is None else [saved[0]],
                               optimizer_states=None if saved is None else [saved[1]], step=start_step)
        writer = _tensorboard_writer(options.tensorboard) if main else None
        if options.diagnose:
            every = options.every or max(1, train.steps // RECORDINGS_PER_RUN)
            engine.attach_monitors(every, writers=[writer] if writer is not None else [])
            _notify(options, f"recording diagnostics every {every} steps on the {name} engine"
                    + (" (each recording step runs on a reference copy of the model under the monitor: slower "
                       "than training alone)" if name == "stacked" else ""))
        if options.progress and getattr(engine, "compiling", False):
            _notify(options, COMPILING)

        def checkpoint(step: int) -> None:
            if main:
                run.save_checkpoint(engine.model_state(0), engine.optimizer_state(0), step)
            if engine.monitors:  # on every rank: the statistics are reduced over all of them; rank 0 writes
                engine.monitors[0].save(run.path)

        def log(_: int, row: dict[str, Any]) -> None:
            run.append_metrics(row)
            if writer is not None:
                writer.log_metrics(row)

        events = LoopEvents(log=log if main else None, checkpoint=checkpoint)
        try:
            diverged = train_loop(engine, [train], splits.train, splits.val, start_step=start_step, events=events,
                                  progress=options.progress and main)
        finally:
            engine.close()  # closes the monitors, and the writer with them
            if writer is not None and not engine.monitors:
                writer.close()
        if diverged:
            raise TrainingDiverged(diverged[0].message(train), diverged[0].step)
        model = engine.modules()[0]
        outcome = TrainOutcome(run, final={}, engine=name)
        if not main:
            outcome.final = dict.fromkeys(("train", "val", "test"), math.nan)
            return outcome
        if options.calibrate:
            outcome.calibration = _calibrate(run, model, splits)
        outcome.final = record_final_losses(run, model, splits)
    if options.diagnose:
        outcome.report = write_report(run.path)
    return outcome


def _tensorboard_writer(folder: str | Path | None) -> Any:
    """A live TensorBoard writer into `folder` (None without one); a clear error without the extra."""
    if folder is None:
        return None
    from normlab.diagnostics import TensorBoardWriter

    try:
        return TensorBoardWriter(folder)
    except ImportError:
        raise ConfigError("--tensorboard needs TensorBoard: pip install tensorboard (or the extra "
                          "normlab[tensorboard])") from None


def _notify(options: TrainOptions, line: str) -> None:
    if options.notice is not None:
        options.notice(line)


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
    them to `RUN/tensorboard/` for `tensorboard --logdir RUN`). For a sweep's folder (`normlab sweep --out`),
    write its comparison page instead (`normlab.sweeps.page`)."""
    from normlab.sweeps.summary import is_sweep_directory

    if is_sweep_directory(run_path):
        if tensorboard:
            raise ConfigError("--tensorboard exports one run: give one of the sweep's run directories")
        from normlab.sweeps.page import write_sweep_report

        return write_sweep_report(run_path)
    from normlab.runs.report import write_run_report

    return write_run_report(RunDir.open(run_path), tensorboard=tensorboard)


@dataclass
class Inspection:
    """One forward and backward pass of a preset at initialisation."""

    table: str
    findings: list[Any]
    initial_loss: float
    uniform_loss: float


def compile_steps(configs: dict[str, RunConfig], *, threads: int | None = None, everything: bool = False
                  ) -> Iterator[tuple[str, str]]:
    """Compile the stacked engine's steps of each named config into the kernel cache (see
    `normlab.training.engines.stacked.kernels`); yields (name, what happened: "FAILED ..." if it failed). With
    `everything`, configs the stacked engine does not train are skipped quietly rather than reported."""
    import time

    for name, config in configs.items():
        config.validate()
        engine_name = choose_engine(config.model, config.train)
        reason = (f"it trains on the {engine_name} engine" if engine_name != "stacked"
                  else f"it trains on {config.train.device}" if config.train.device != "cpu"
                  else "train.compile is false" if config.train.compile is False else None)
        if reason is not None:
            if not everything:
                yield name, f"nothing to compile: {reason}"
            continue
        vocab, splits = load_data(config)
        train = dataclasses.replace(config.train, engine="stacked")
        with torch_threads(threads or threads_for(work_per_step([config.model], train.batch_size))):
            engine = create_engine([config.model], [train], len(vocab), splits.train)
            if not engine.compiling and engine.compiled:
                yield name, "already compiled (cached)"
                continue
            started = time.perf_counter()
            try:
                engine.compile()
            except Exception as error:  # no C++ compiler...: training still works, uncompiled
                yield name, f"FAILED ({type(error).__name__}: {str(error).splitlines()[0][:300]}); it trains uncompiled"
                continue
        yield name, f"compiled in {time.perf_counter() - started:.0f} s"


def inspect_preset(config: RunConfig, batch_size: int = 256) -> Inspection:
    """Build `config`'s model, run one training-mode forward and backward pass on a batch of training examples
    (no update) and return the per-layer table and the findings."""
    from normlab.diagnostics import find_issues, format_layer_table, inspect_model

    config.validate()
    preflight.check_batch(config, batch_size, "--batch")
    vocab, splits = load_data(config)
    preflight.check_memory(dataclasses.replace(config, train=dataclasses.replace(config.train, batch_size=batch_size)),
                           len(vocab))
    model = build_model(config.model, len(vocab), seed=config.train.seed)
    x, y = random_batch(splits.train, batch_size, config.train.seed)
    diagnostics = inspect_model(model, x, y)
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(x), y).item()
    return Inspection(format_layer_table(diagnostics), find_issues(diagnostics, vocab_size=len(vocab)), loss,
                      math.log(len(vocab)))


def _calibrate(run: RunDir, model: torch.nn.Module, splits: Splits, before: str = "running") -> dict[str, Any]:
    """Calibrate `model` (training's weights) on the training split and commit it, keeping training's weights."""
    val_before = evaluate(model, *splits.val)
    layers = calibrate_batchnorm(model, splits.train[0])
    val_after = evaluate(model, *splits.val)
    state = model.state_dict()
    if not all(torch.isfinite(value).all() for value in state.values() if value.is_floating_point()):
        raise CheckpointError(f"calibrating {run.path} gave NaN or Inf statistics (are its weights damaged?): "
                              "nothing was written")
    run.save_calibrated(state)
    result = {"layers": layers, "val_before": val_before, "val_after": val_after, "before": before}
    run.append_metrics({"event": "calibrate", **result})
    return result


def calibrate_run(run_path: str | Path) -> dict[str, Any]:
    """Recompute the population statistics of every BatchNorm of a finished run, from the weights training left
    (kept as they were, beside the calibrated ones, so calibrating again gives the same result and extending
    the run stays exact); val loss before and after. `before` says what the first loss used: "running"
    statistics, or "earlier calibration" for an old run directory calibrated before training's weights were
    kept."""
    with RunDir.open(run_path, lock="calibrate") as run:
        if not has_batchnorm(run.config):
            raise CheckpointError(f"{run.path} has no BatchNorm layer to calibrate (model.norm="
                                  f"{run.config.model.norm})")
        current = run.checkpoint()
        if current is not None and current.step < run.config.train.steps:
            raise CheckpointError(f"{run.path} stopped at step {current.step} of {run.config.train.steps}: "
                                  f"finish it first (`normlab train --resume --out {run.path}`), then calibrate")
        model, _ = run.load_model(uncalibrated=True)
        check_words_file(run, strict=False)
        _, splits = load_data(run.config, run.vocab)
        legacy = current is not None and current.calibrated and not current.keeps_uncalibrated
        return _calibrate(run, model, splits, "earlier calibration" if legacy else "running")


def evaluate_run(run_path: str | Path, split: str = "val", data: str | Path | None = None) -> tuple[float, int]:
    """Loss of a run on one of its splits, or on every word of another file; returns (loss, examples)."""
    if split not in ("train", "val", "test"):
        raise DataError(f"unknown split {split!r}: choose train, val or test")
    run = RunDir.open(run_path)
    model, _ = run.load_model()
    if data is not None:
        words = load_words(data)
        run.vocab.check_words(words, source=str(data))
        x, y = build_dataset(words, run.vocab, run.config.model.block_size)
    else:
        check_words_file(run, strict=False)
        _, splits = load_data(run.config, run.vocab)
        x, y = splits.get(split)
    if len(x) == 0:
        raise DataError(f"the {split} split of {run.path} is empty: the word list is too short to split 80/10/10")
    return evaluate(model, x, y), len(x)


def sample_run(run_path: str | Path, n: int = 20, *, temperature: float = 1.0, top_k: int | None = None,
               seed: int = 0, greedy: bool = False) -> tuple[Samples, Diversity]:
    """Sample `n` words from a run (with `greedy`, the most likely one) and measure their diversity against its
    training words."""
    run = RunDir.open(run_path)
    model, _ = run.load_model()
    check_words_file(run, strict=False)
    _, splits = load_data(run.config, run.vocab)
    samples = sample_words(model, run.vocab, n, temperature=temperature, top_k=top_k, seed=seed, greedy=greedy)
    return samples, diversity(samples, splits.train_words)


def export_run(run_path: str | Path, out: str | Path, *, fold: bool = False, force: bool = False) -> Any:
    """Write the run's weights for inference to the safetensors file `out` (see `normlab.runs.export`); with
    `fold`, every eval-mode batch norm that follows a Linear is folded into it. An existing `out` is replaced
    only with `force`. Returns the `Exported` summary."""
    from normlab.runs.export import export_weights

    return export_weights(RunDir.open(run_path), out, fold=fold, force=force)
