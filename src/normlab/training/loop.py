"""The training loop: what every run has, whatever engine computes its steps.

`train_loop` owns the learning-rate schedule, the batches (a pure function of seed and step, see
`normlab.training.schedule`), the batch losses kept on the device and checked every `SYNC_EVERY` steps, the
evaluations on fixed subsets, checkpoints, Ctrl-C (a checkpoint at the next step boundary; with several
processes, at the next sync, which they agree on), resuming from a step, diagnostics' recording steps and one
divergence policy:

    A model whose batch loss becomes NaN or Inf has diverged at that step. The loop notices at the next sync
    (every SYNC_EVERY steps, and before every evaluation and checkpoint), so neither an evaluation nor a
    checkpoint ever follows a divergence unnoticed; it stops once every model has diverged, and returns who
    diverged where. (A single run then fails with the step and the likely cause: `Divergence.message`.)
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from normlab.config import TrainConfig
from normlab.data import random_subset
from normlab.errors import ConfigError
from normlab.training.engines import SHARED_FIELDS, Engine, Split
from normlab.training.schedule import batch_table, learning_rates, table_steps

SYNC_EVERY = 100  # steps between host syncs: the progress bar, the divergence check and the batch-loss log


@dataclass(frozen=True)
class Divergence:
    """Model's first NaN/Inf batch loss: the step (0-based) and the value."""

    step: int
    value: float

    def message(self, config: TrainConfig) -> str:
        """The step, the learning rate and the likely cause, for a person."""
        from normlab.training.schedule import learning_rate

        kind = "NaN" if math.isnan(self.value) else "Inf"
        return (f"the loss became {kind} at step {self.step} (learning rate {learning_rate(config, self.step):g}). "
                "Likely cause: the learning rate is too high for this initialisation, so activations or gradients "
                "exploded. Try a lower train.lr, train.grad_clip, a norm layer (model.norm=batch) or a smaller "
                "model.weight_scale")


@dataclass
class LoopEvents:
    """Callbacks of the loop, each optional: `log(i, row)` gets model i's metrics rows, `checkpoint(done)` is
    called after `done` steps when a checkpoint is due, `sync(done)` after every host sync."""

    log: Callable[[int, dict[str, Any]], None] | None = None
    checkpoint: Callable[[int], None] | None = None
    sync: Callable[[int], None] | None = None


class Interrupted(Exception):
    """Training stopped at a step boundary on Ctrl-C, after the checkpoint callback saved that step."""

    def __init__(self, step: int) -> None:
        super().__init__(f"interrupted at step {step}")
        self.step = step


class _InterruptFlag:
    """Turns the first Ctrl-C into a flag read between steps; a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.raised = False
        self._previous: Any = None

    def __enter__(self) -> _InterruptFlag:
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: leave Ctrl-C alone
            self._previous = None
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.raised:
            raise KeyboardInterrupt
        self.raised = True

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class LossWindow:
    """The batch losses (one column per model) of the steps since the last multiple of SYNC_EVERY, kept on the
    device and read back (one host sync) only when checked."""

    def __init__(self, models: int, device: torch.device) -> None:
        self.values = torch.zeros((SYNC_EVERY, models), device=device)

    def record(self, step: int, losses: torch.Tensor) -> None:
        """Store the losses (K, M) of the K steps from `step` (within one window)."""
        start = step % SYNC_EVERY
        self.values[start:start + losses.shape[0]] = losses  # one call: the slice and its copy

    def agree(self, engine: Engine, last: int, stop: bool) -> bool:
        """Replace the losses up to step `last` by those the engine's processes agree on (`Engine.agree`); whether
        any process was asked to stop."""
        window = self.values[: last % SYNC_EVERY + 1]
        agreed, stop = engine.agree(window, stop)
        window.copy_(agreed)
        return stop

    def check(self, last: int, diverged: dict[int, Divergence]) -> float:
        """Record in `diverged` each model's first NaN/Inf loss up to step `last`; the mean of the finite losses."""
        window = self.values[: last % SYNC_EVERY + 1]
        for position, model in (~torch.isfinite(window)).nonzero().tolist():
            if model not in diverged:
                diverged[model] = Divergence(last - last % SYNC_EVERY + position, float(window[position, model]))
        finite = window[torch.isfinite(window)]
        return finite.mean().item() if len(finite) else float("nan")


def eval_subsets(train_xy: Split, val_xy: Split, config: TrainConfig) -> tuple[Split, Split]:
    """Fixed random subsets of at most `eval_examples` examples of the train and val splits, the same at every
    evaluation of a run (drawn from a generator seeded with seed + 1)."""
    generator = torch.Generator().manual_seed(config.seed + 1)
    return random_subset(train_xy, config.eval_examples, generator), random_subset(val_xy, config.eval_examples,
                                                                                     generator)


def check_lockstep(configs: Sequence[TrainConfig]) -> None:
    """Raise `ConfigError` unless the configs agree on what models trained together must share."""
    for name in SHARED_FIELDS:
        values = {getattr(c, name) for c in configs}
        if len(values) > 1:
            raise ConfigError(f"configurations trained at once must share train.{name}; got {sorted(values, key=str)}")


class _Batches:
    """The batch indices (M, L, B) and learning rates (L, M) of the current batch table, drawn table by table;
    `steps` (L, M, B) and `rates` slice into what `Engine.run_steps` takes, and `single(k)` gives step k's alone
    (made for the whole table in one call on first use: one-step calls then slice nothing)."""

    def __init__(self, configs: Sequence[TrainConfig], num_examples: int, device: torch.device) -> None:
        self.configs, self.num_examples, self.device = configs, num_examples, device
        self.length = table_steps(configs[0].batch_size)
        self.table = -1
        self.seeds = sorted({c.seed for c in configs})
        schedules: dict[tuple, list[int]] = {}  # models with equal schedules share one column of rates
        for i, c in enumerate(configs):
            key = (c.lr, c.schedule, c.lr_decay_step, c.lr_decay_factor, c.warmup_steps, c.min_lr_factor, c.steps)
            schedules.setdefault(key, []).append(i)
        self.schedules = list(schedules.values())

    def at(self, step: int) -> int:
        """Make the table holding `step` current; the step's position in it."""
        table = step // self.length
        if table != self.table:
            self.table = table
            rows = {s: batch_table(s, table, self.num_examples, self.configs[0].batch_size) for s in self.seeds}
            self.indices = torch.stack([rows[c.seed] for c in self.configs]).to(self.device)  # (M, L, B)
            start = table * self.length
            rates = torch.empty(self.length, len(self.configs), dtype=torch.float64)
            for models in self.schedules:
                rates[:, models] = learning_rates([self.configs[models[0]]], start, self.length)
            self.rates = rates
            self.steps = self.indices.transpose(0, 1)  # (L, M, B)
            self._single: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]] | None = None
        return step % self.length

    def single(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The indices (1, M, B) and rates (1, M) of step k of the current table."""
        if self._single is None:
            # unbind makes views 4x faster than split(1)
            self._single = (self.steps.unsqueeze(1).unbind(0), self.rates.unsqueeze(1).unbind(0))
        return self._single[0][k], self._single[1][k]


def train_loop(engine: Engine, configs: Sequence[TrainConfig], train_xy: Split, val_xy: Split, *,
               start_step: int = 0, events: LoopEvents | None = None, progress: bool = True) -> dict[int, Divergence]:
    """Train the engine's M models (config i for model i) from `start_step` to `configs[0].steps`; returns the
    models that diverged (see the module notes).

    Every `eval_every` steps (and at the end) the losses on fixed subsets of the train and val splits go to
    `events.log`; every `checkpoint_every` steps (and at the end) `events.checkpoint(done)` is called. Ctrl-C
    checkpoints at the next step boundary and raises `Interrupted`. On recording steps of the engine's monitors
    (`engine.records(step)`), the step goes through `engine.record_step`.
    """
    configs = _checked(configs)
    events = events or LoopEvents()
    first, count = configs[0], engine.num_models
    subsets = [eval_subsets(train_xy, val_xy, c) for c in configs]
    batches = _Batches(configs, len(train_xy[0]), engine.device)
    window = LossWindow(count, engine.device)
    diverged: dict[int, Divergence] = {}
    bar = _progress_bar(first.steps, start_step, progress)
    started = time.perf_counter()

    def due(done: int, every: int) -> bool:
        return done % every == 0 or done == first.steps

    def event_after(done: int) -> bool:  # anything that must happen after `done` steps, before the next step
        return (done % SYNC_EVERY == 0 or due(done, first.eval_every) or due(done, first.checkpoint_every)
                or engine.records(done))

    def call_size(step: int, k: int) -> int:  # steps_per_call when no event falls inside the call, else 1
        size = engine.steps_per_call
        if size == 1:
            return 1
        fits = k + size <= batches.length and step + size <= first.steps
        return size if fits and not any(event_after(d) for d in range(step + 1, step + size)) else 1

    step = start_step
    with _InterruptFlag() as interrupt:
        while step < first.steps:
            losses, size = _advance(engine, batches, step, call_size)
            window.record(step, losses)
            step += size
            done = step
            eval_due, checkpoint_due = due(done, first.eval_every), due(done, first.checkpoint_every)
            stop = interrupt.raised and engine.processes == 1  # several processes agree on a stop at a sync
            if done % SYNC_EVERY == 0 or eval_due or checkpoint_due or stop:
                stop = window.agree(engine, done - 1, interrupt.raised)
                _show_progress(bar, done, window.check(done - 1, diverged))
                if events.sync is not None:
                    events.sync(done)
                if len(diverged) == count:
                    break
            if eval_due and events.log is not None:
                _log_losses(engine, subsets, configs, done, time.perf_counter() - started, events.log)
            saved = checkpoint_due or stop
            if saved and events.checkpoint is not None:
                events.checkpoint(done)
            if stop or (saved and interrupt.raised and engine.processes == 1):  # a Ctrl-C during the save: saved
                _close(bar)
                raise Interrupted(done)
    _close(bar)
    return diverged


def _checked(configs: Sequence[TrainConfig]) -> list[TrainConfig]:
    """The configs with their unset intervals resolved (from the number of steps), validated, in lockstep."""
    configs = [config.resolved() for config in configs]
    for config in configs:
        config.validate()
    check_lockstep(configs)
    return configs


def _advance(engine: Engine, batches: _Batches, step: int,
             call_size: Callable[[int, int], int]) -> tuple[torch.Tensor, int]:
    """Train from `step`: that step alone (observed by the monitors if it records), or a call of several steps;
    the losses (K, M) and K."""
    k = batches.at(step)
    if engine.records(step):  # observed, and trained by the engine or below (maybe in a call of several steps)
        losses = engine.record_step(step, batches.indices[:, k], batches.rates[k])
        if losses is not None:
            return losses, 1
    size = call_size(step, k)
    if size == 1:
        return engine.run_steps(*batches.single(k)), 1
    return engine.run_steps(batches.steps[k:k + size], batches.rates[k:k + size]), size


def _log_losses(engine: Engine, subsets: Sequence[tuple[Split, Split]], configs: Sequence[TrainConfig], done: int,
                elapsed: float, log: Callable[[int, dict[str, Any]], None]) -> None:
    from normlab.training.schedule import learning_rate

    losses = [engine.evaluate([s[split] for s in subsets]) for split in (0, 1)]
    for i, config in enumerate(configs):
        log(i, {"step": done, "train_loss": losses[0][i], "val_loss": losses[1][i],
                "lr": learning_rate(config, done - 1), "elapsed_s": round(elapsed, 3)})


def _progress_bar(total: int, initial: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, smoothing=0.1)


def _show_progress(bar: Any, done: int, loss: float) -> None:
    if bar is not None:
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        bar.update(done - bar.n)


def _close(bar: Any) -> None:
    if bar is not None:
        bar.close()
