"""The sweep runner: train many configurations, each exactly as it would train alone.

Configurations that share a lockstep key (`normlab.training.engines.lockstep_key`: the stacked engine, one
architecture, the train fields models trained together must share) and have no `prepare` function train
together on one stacked engine, in lockstep groups of at most `group_size` models; every other run trains alone
on its engine. All of them go through the one training loop. A run whose loss becomes NaN/Inf is a result, not a
crash: its `diverged_at` says at which step, and its final losses are NaN.

The groups are independent, so they train on a backend (`normlab.sweeps.backends`): here, one after the other,
or in worker processes. Modules are built only where a caller asks for one (`SweepResult.model`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from normlab.config import ModelConfig, TrainConfig
from normlab.data import Splits, random_subset
from normlab.errors import ConfigError
from normlab.model import LanguageModel, build_model
from normlab.training import LoopEvents, create_engine, train_loop
from normlab.training.engines import Engine, Split, lockstep_key

PARALLEL_MIN_STEPS = 20_000  # model-steps below which starting worker processes (about 2 s) does not pay
_default_backend: contextvars.ContextVar[Any] = contextvars.ContextVar("sweep_backend", default=None)


@dataclass
class SweepRun:
    """One configuration of a sweep.

    `prepare`, if given, is called on the freshly built model before training (e.g. to remove parameters that
    `ModelConfig` cannot switch off); such runs train alone on the reference engine. It must be a module-level
    function so that worker processes can import it.
    """

    name: str
    model: ModelConfig
    train: TrainConfig
    prepare: Callable[[LanguageModel], None] | None = None


@dataclass
class SweepResult:
    """What one run of a sweep produced.

    `train_loss` and `val_loss` are the final mean cross-entropies in eval mode on the whole train and val
    splits, or on the same fixed random subsets of at most `final_examples` examples of each when the sweep was
    given that limit; NaN for a diverged run. `rows` are the metrics rows logged every `eval_every` steps.
    `seconds` is the wall time of the group that trained the run (shared by the runs of a group); `engine` the
    engine that trained it. `state` (with `keep_models`) is the trained model's state dict and `model` builds
    it; `snapshots` maps each requested step to the state dict after that many steps (`snapshot(step)` builds
    it); `diagnostics` holds what a Monitor recorded (with `diagnose_every`).
    """

    name: str
    train_loss: float
    val_loss: float
    rows: list[dict[str, Any]]
    diverged_at: int | None
    seconds: float
    engine: str
    run: SweepRun
    vocab_size: int
    state: dict[str, torch.Tensor] | None = None
    snapshots: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    diagnostics: Any = None

    @functools.cached_property
    def model(self) -> LanguageModel | None:
        """The trained model, built from `state` on first use (None without `keep_models`)."""
        return None if self.state is None else self._build(self.state)

    def snapshot(self, step: int) -> LanguageModel:
        """The model after `step` steps, built from its snapshot."""
        return self._build(self.snapshots[step])

    def _build(self, state: dict[str, torch.Tensor]) -> LanguageModel:
        model = build_model(self.run.model, self.vocab_size, seed=self.run.train.seed)
        if self.run.prepare is not None:
            self.run.prepare(model)
        model.load_state_dict(state)
        return model


@dataclass
class Group:
    """Runs trained by one engine: several in lockstep on the stacked engine, or one alone."""

    indices: list[int]
    runs: list[SweepRun]

    @property
    def cost(self) -> float:
        """A rough relative cost, to start the longest groups first."""
        config = self.runs[0].train
        return config.steps * (1.0 + 0.5 * len(self.runs)) * max(1.0, config.batch_size / 64)


@dataclass
class Job:
    """What every group of a sweep needs besides its runs (sent once to each worker process)."""

    train_xy: Split
    val_xy: Split
    final_train: Split
    final_val: Split
    vocab_size: int
    snapshot_steps: tuple[int, ...]
    keep_models: bool
    diagnose_every: int | None = None


def run_sweep(runs: Sequence[SweepRun], splits: Splits, vocab_size: int, *, progress: bool = True,
              processes: int | None = None, keep_models: bool = False, snapshot_steps: Sequence[int] = (),
              final_examples: int | None = None, group_size: int = 8, diagnose_every: int | None = None,
              backend: Any = None) -> list[SweepResult]:
    """Train every run and return their results in the order of `runs`.

    `splits`: the train and val pairs are used. `processes`: worker processes of the default backend, or None
    for automatic: 2 when there are at least two groups, two CPU cores and `PARALLEL_MIN_STEPS` steps of work in
    all, else 1 (this process). `keep_models`: keep each trained model's state. `snapshot_steps`: steps (0 = at
    initialisation) after which to keep each model's state. `final_examples`: evaluate the final losses on fixed
    random subsets of at most that many examples (None: the whole splits). `group_size`: the most runs trained
    together. `diagnose_every`: record diagnostics every that many steps. `backend`: where the groups train (a
    `normlab.sweeps.backends` backend; None: the one `use_backend` set, else local processes as `processes`
    says).
    """
    from normlab.sweeps.backends import LocalBackend

    backend = backend if backend is not None else _default_backend.get()
    _check_runs(runs, snapshot_steps, processes, final_examples, group_size)
    groups = sorted(lockstep_groups(runs, group_size), key=lambda group: -group.cost)
    final_train = random_subset(splits.train, final_examples, torch.Generator().manual_seed(1))
    final_val = random_subset(splits.val, final_examples, torch.Generator().manual_seed(2))
    job = Job(splits.train, splits.val, final_train, final_val, vocab_size, tuple(sorted(set(snapshot_steps))),
              keep_models, diagnose_every)
    work = sum(run.train.steps for run in runs)
    if backend is None:
        if processes is None:
            enough = len(groups) >= 2 and work >= PARALLEL_MIN_STEPS and (os.cpu_count() or 1) >= 2
            processes = 2 if enough else 1
        backend = LocalBackend(min(processes, len(groups)))
    bar = _bar(work, progress)
    try:
        outputs = backend.train_groups(groups, job, bar.update if bar is not None else None)
        if bar is not None:
            bar.update(bar.total - bar.n)  # ticks still on their way when the last group finished
    finally:
        if bar is not None:
            bar.close()
    results: list[SweepResult | None] = [None] * len(runs)
    for group, group_output in zip(groups, outputs):
        for index, run, output in zip(group.indices, group.runs, group_output):
            results[index] = _result(run, output, vocab_size)
    return results


@contextlib.contextmanager
def use_backend(backend: Any) -> Iterator[None]:
    """Within the block, `run_sweep` calls that name no backend train their groups on `backend` (e.g. every sweep
    of a lab run on Ray)."""
    token = _default_backend.set(backend)
    try:
        yield
    finally:
        _default_backend.reset(token)


def _check_runs(runs: Sequence[SweepRun], snapshot_steps: Sequence[int], processes: int | None,
                final_examples: int | None, group_size: int) -> None:
    if not runs:
        raise ConfigError("a sweep needs at least one run")
    names = [run.name for run in runs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(f"sweep run names must be unique; repeated: {', '.join(duplicates)}")
    for run in runs:
        run.model.validate()
        run.train.validate()
        late = [step for step in snapshot_steps if not 0 <= step <= run.train.steps]
        if late:
            raise ConfigError(f"snapshot steps {late} are outside 0..{run.train.steps}, the steps of run "
                              f"{run.name!r}: give steps within every run's budget")
    if processes is not None and processes < 1:
        raise ConfigError(f"processes must be at least 1 (or None for automatic), got {processes}")
    if final_examples is not None and final_examples < 1:
        raise ConfigError(f"final_examples must be at least 1 (or None for the whole splits), got {final_examples}")
    if group_size < 1:
        raise ConfigError(f"group_size must be at least 1, got {group_size}")


def lockstep_groups(runs: Sequence[SweepRun], group_size: int) -> list[Group]:
    """The runs in groups that train together: equal lockstep keys, at most `group_size` a group, the groups of
    one key of even sizes (9 runs by 8 make 5 + 4, not 8 + 1); every other run alone."""
    keyed: dict[tuple, list[int]] = {}
    groups = []
    for index, run in enumerate(runs):
        key = None if run.prepare is not None else lockstep_key(run.model, run.train)
        if key is None:
            groups.append(Group([index], [run]))
        else:
            keyed.setdefault(key, []).append(index)
    for indices in keyed.values():
        count = math.ceil(len(indices) / group_size)
        size = math.ceil(len(indices) / count)
        for start in range(0, len(indices), size):
            part = indices[start:start + size]
            groups.append(Group(part, [runs[i] for i in part]))
    return groups


def _snapshot_every(steps: int, snapshot_steps: Sequence[int]) -> int:
    """A checkpoint interval that lands on every snapshot step (the sweep writes no checkpoints: its checkpoint
    event takes the snapshots)."""
    every = steps
    for step in snapshot_steps:
        if step > 0:
            every = math.gcd(every, step)
    return every


def _engine(group: Group, trains: list[TrainConfig], job: Job) -> Engine:
    run = group.runs[0]
    if run.prepare is None:
        return create_engine([r.model for r in group.runs], trains, job.vocab_size, job.train_xy)
    from normlab.training.engines.reference import ReferenceEngine

    model = build_model(run.model, job.vocab_size, seed=trains[0].seed)
    run.prepare(model)
    return ReferenceEngine(model, trains[0], job.train_xy)


def train_group(group: Group, job: Job, tick: Callable[[int], Any] | None) -> list[dict[str, Any]]:
    """Train the runs of `group`; one output dict per run (losses, rows, divergence, states, diagnostics).
    `tick(n)` is called with the model-steps done since its last call."""
    from normlab.training import choose_engine

    started = time.perf_counter()
    count = len(group.runs)
    snapshots = [s for s in job.snapshot_steps if s <= group.runs[0].train.steps]
    every = _snapshot_every(group.runs[0].train.steps, snapshots)
    trains = [replace(run.train, checkpoint_every=every) for run in group.runs]
    engine = _engine(group, trains, job)
    if job.diagnose_every is not None:
        engine.attach_monitors(job.diagnose_every)
    rows: list[list[dict[str, Any]]] = [[] for _ in range(count)]
    taken: list[dict[int, dict]] = [{} for _ in range(count)]
    last = [0]

    def snapshot(step: int) -> None:
        if step in snapshots:
            for i in range(count):
                taken[i][step] = _copy(engine.model_state(i))

    def on_sync(step: int) -> None:
        if tick is not None:
            tick(count * (step - last[0]))
        last[0] = step

    snapshot(0)
    try:
        diverged = train_loop(engine, trains, job.train_xy, job.val_xy, progress=False,
                              events=LoopEvents(log=lambda i, row: rows[i].append(row), checkpoint=snapshot,
                                                sync=on_sync))
    finally:
        engine.close()
    on_sync(trains[0].steps)
    losses = [engine.evaluate([split] * count) for split in (job.final_train, job.final_val)]
    seconds = time.perf_counter() - started
    name = "reference" if group.runs[0].prepare is not None else choose_engine(group.runs[0].model, trains[0])
    return [{"train_loss": losses[0][i], "val_loss": losses[1][i], "rows": rows[i],
             "diverged_at": diverged[i].step if i in diverged else None, "snapshots": taken[i],
             "state": _copy(engine.model_state(i)) if job.keep_models else None, "seconds": seconds, "engine": name,
             "diagnostics": engine.monitors[i].diagnostics if engine.monitors else None}
            for i in range(count)]


def _copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in state.items()}


def _result(run: SweepRun, output: dict[str, Any], vocab_size: int) -> SweepResult:
    diverged = output["diverged_at"]
    nan = float("nan")
    return SweepResult(
        name=run.name, train_loss=nan if diverged is not None else output["train_loss"],
        val_loss=nan if diverged is not None else output["val_loss"], rows=output["rows"], diverged_at=diverged,
        seconds=output["seconds"], engine=output["engine"], run=run, vocab_size=vocab_size,
        state=output["state"], snapshots=output["snapshots"],
        diagnostics=output["diagnostics"])


def _bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="step", desc="sweep", dynamic_ncols=True, smoothing=0.1)
