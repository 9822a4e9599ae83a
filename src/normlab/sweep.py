"""The sweep runner: train many configurations, each exactly as `train.train` would train it alone.

Runs that can share the stacked path (`normlab.stacked.stacking_problem` is None, `train.fast` is on, no
`prepare` function) and agree on the architecture and on the train fields a lockstep run must share
(`normlab.fast.SHARED_FIELDS`) are trained together with `train_stacked`, in chunks of at most `group_size`
models; every other run goes through the reference loop `train.train`. A run whose loss becomes NaN/Inf is a
result, not a crash: its `diverged_at` says at which step, and its final losses are NaN.

Chunks train with one thread each: measured on this project's 2-core machine (24 lesson-sized runs x 3,000 steps
in four chunks), one process took 22.3 s with one thread and 22.8 s with two, and two one-thread worker processes
took 13.7 s, start-up included; with the other core busy, two threads in one process ran up to 5x slower than one.
So independent chunks go to two spawned worker processes when there are at least two chunks and enough work to
pay for starting them (`PARALLEL_MIN_STEPS`), else they train here one after the other. One progress bar counts
the steps of every run.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from normlab.data import Splits
from normlab.errors import ConfigError, TrainingDiverged
from normlab.fast import SHARED_FIELDS, evaluate_stacked, train_stacked
from normlab.model import LanguageModel, ModelConfig, build_model
from normlab.stacked import SHAPE_FIELDS, StackedMLP, stacking_problem
from normlab.train import SYNC_EVERY, TrainConfig, TrainEvents, evaluate, torch_threads, train

Split = tuple[torch.Tensor, torch.Tensor]
PARALLEL_MIN_STEPS = 20_000  # model-steps below which starting worker processes (about 2 s) does not pay


@dataclass
class SweepRun:
    """One configuration of a sweep.

    `prepare`, if given, is called on the freshly built model before training (e.g. to remove parameters that
    `ModelConfig` cannot switch off); such runs always take the reference loop. It must be a module-level
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
    given that limit; NaN for a diverged run. `rows` are the metrics rows `train.train` logs every `eval_every`
    steps. `seconds` is the wall time of the chunk that trained the run (shared by the runs of a chunk).
    `model` (with `keep_models`) is the trained model; `snapshots` maps each requested step to a copy of the
    model after that many steps.
    """

    name: str
    train_loss: float
    val_loss: float
    rows: list[dict[str, Any]]
    diverged_at: int | None
    seconds: float
    stacked: bool
    model: LanguageModel | None = None
    snapshots: dict[int, LanguageModel] = field(default_factory=dict)


@dataclass
class _Chunk:
    """Runs trained by one call: several on the stacked path, or one on the reference path."""

    indices: list[int]
    runs: list[SweepRun]
    stacked: bool

    @property
    def cost(self) -> float:
        """A rough relative cost, to start the longest chunks first."""
        config = self.runs[0].train
        return config.steps * (1.0 + 0.5 * len(self.runs)) * max(1.0, config.batch_size / 64)


@dataclass
class _Job:
    """What every chunk of a sweep needs besides its runs (sent once to each worker process)."""

    train_xy: Split
    val_xy: Split
    final_train: Split
    final_val: Split
    vocab_size: int
    snapshot_steps: tuple[int, ...]
    keep_models: bool


def run_sweep(runs: Sequence[SweepRun], splits: Splits, vocab_size: int, *, progress: bool = True,
              processes: int | None = None, keep_models: bool = False, snapshot_steps: Sequence[int] = (),
              final_examples: int | None = None, group_size: int = 8) -> list[SweepResult]:
    """Train every run and return their results in the order of `runs`.

    `splits`: the train and val pairs are used. `processes`: worker processes, or None for automatic: 2 when
    there are at least two chunks, two CPU cores and `PARALLEL_MIN_STEPS` steps of work in all, else 1 (this
    process). `keep_models`: return each trained model. `snapshot_steps`: steps (0 = at initialisation) after which
    to keep a copy of each model. `final_examples`: evaluate the final losses on fixed random subsets of at most
    that many examples (None: the whole splits). `group_size`: the most runs trained together in one chunk.
    """
    _check_runs(runs, snapshot_steps, processes, final_examples, group_size)
    chunks = sorted(_chunks(runs, group_size), key=lambda chunk: -chunk.cost)
    final_train, final_val = _subset(splits.train, final_examples, 1), _subset(splits.val, final_examples, 2)
    job = _Job(splits.train, splits.val, final_train, final_val, vocab_size, tuple(sorted(set(snapshot_steps))),
               keep_models)
    work = sum(run.train.steps for run in runs)
    if processes is None:
        processes = 2 if len(chunks) >= 2 and work >= PARALLEL_MIN_STEPS and (os.cpu_count() or 1) >= 2 else 1
    bar = _bar(work, progress)
    try:
        if min(processes, len(chunks)) == 1:
            outputs = _in_this_process(chunks, job, bar)
        else:
            outputs = _in_processes(chunks, job, min(processes, len(chunks)), bar)
    finally:
        if bar is not None:
            bar.close()
    results: list[SweepResult | None] = [None] * len(runs)
    for chunk, chunk_output in zip(chunks, outputs):
        for index, run, output in zip(chunk.indices, chunk.runs, chunk_output):
            results[index] = _result(run, output, vocab_size, chunk.stacked)
    return results


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


def _lockstep_key(run: SweepRun) -> tuple | None:
    """Runs with equal keys can be trained together on the stacked path; None: only on the reference path."""
    if run.prepare is not None or not run.train.fast or stacking_problem(run.model) is not None:
        return None
    model = run.model
    hidden_bias = (model.norm == "none") if model.hidden_bias is None else model.hidden_bias
    shape = tuple(getattr(model, name) for name in SHAPE_FIELDS if name != "hidden_bias")
    return shape + (hidden_bias,) + tuple(getattr(run.train, name) for name in SHARED_FIELDS)


def _chunks(runs: Sequence[SweepRun], group_size: int) -> list[_Chunk]:
    groups: dict[tuple, list[int]] = {}
    chunks = []
    for index, run in enumerate(runs):
        key = _lockstep_key(run)
        if key is None:
            chunks.append(_Chunk([index], [run], stacked=False))
        else:
            groups.setdefault(key, []).append(index)
    for indices in groups.values():
        count = math.ceil(len(indices) / group_size)
        size = math.ceil(len(indices) / count)  # even chunks: 9 runs by 8 make 5 + 4, not 8 + 1
        for start in range(0, len(indices), size):
            part = indices[start:start + size]
            chunks.append(_Chunk(part, [runs[i] for i in part], stacked=True))
    return chunks


def _subset(xy: Split, limit: int | None, seed: int) -> Split:
    if limit is None or len(xy[0]) <= limit:
        return xy
    keep = torch.randperm(len(xy[0]), generator=torch.Generator().manual_seed(seed))[:limit]
    return xy[0][keep], xy[1][keep]


def _tick_every(steps: int, snapshot_steps: Sequence[int]) -> int:
    """Steps between progress updates: about 50 per run, on sync boundaries, and dividing every snapshot step."""
    tick = max(SYNC_EVERY, steps // 50 // SYNC_EVERY * SYNC_EVERY)
    for step in snapshot_steps:
        if step > 0:
            tick = math.gcd(tick, step)
    return tick


def _train_chunk(chunk: _Chunk, job: _Job, tick: Callable[[int], Any] | None) -> list[dict[str, Any]]:
    """Train the runs of `chunk`; one output dict per run (losses, rows, divergence, state dicts)."""
    started = time.perf_counter()
    trains = [run.train for run in chunk.runs]
    snapshots = [s for s in job.snapshot_steps if s <= trains[0].steps]
    every = _tick_every(trains[0].steps, snapshots)
    # the sweep writes no checkpoints: the checkpoint callback serves as the progress and snapshot tick
    trains = [replace(config, checkpoint_every=every) for config in trains]
    if chunk.stacked:
        outputs = _train_stacked_chunk(chunk, trains, job, snapshots, tick)
    else:
        outputs = [_train_reference_run(chunk.runs[0], trains[0], job, snapshots, tick)]
    seconds = time.perf_counter() - started
    for output in outputs:
        output["seconds"] = seconds
    return outputs


def _train_stacked_chunk(chunk: _Chunk, trains: list[TrainConfig], job: _Job, snapshots: list[int],
                         tick: Callable[[int], Any] | None) -> list[dict[str, Any]]:
    count = len(chunk.runs)
    stacked = StackedMLP.build([run.model for run in chunk.runs], job.vocab_size, [c.seed for c in trains],
                               device=trains[0].device)
    rows: list[list[dict[str, Any]]] = [[] for _ in range(count)]
    taken: list[dict[int, dict]] = [{} for _ in range(count)]
    last = [0]

    def on_step(step: int) -> None:
        if step in snapshots:
            for i, model in enumerate(stacked.to_models()):
                taken[i][step] = _state(model)
        if tick is not None:
            tick(count * (step - last[0]))
        last[0] = step

    on_step(0)
    diverged = train_stacked(stacked, job.train_xy, job.val_xy, trains, log=lambda i, row: rows[i].append(row),
                             checkpoint=on_step, on_divergence="record", progress=False)
    losses = [evaluate_stacked(stacked, [split] * count) for split in (job.final_train, job.final_val)]
    models = stacked.to_models() if job.keep_models else [None] * count
    return [{"train_loss": losses[0][i], "val_loss": losses[1][i], "rows": rows[i], "diverged_at": diverged.get(i),
             "snapshots": taken[i], "state": _state(models[i]) if models[i] is not None else None}
            for i in range(count)]


def _train_reference_run(run: SweepRun, config: TrainConfig, job: _Job, snapshots: list[int],
                         tick: Callable[[int], Any] | None) -> dict[str, Any]:
    model = build_model(run.model, job.vocab_size, seed=config.seed)
    if run.prepare is not None:
        run.prepare(model)
    rows: list[dict[str, Any]] = []
    taken: dict[int, dict] = {}
    losses = torch.zeros(config.steps)  # every batch loss, written without a host sync, to find a divergence
    step_now = [0]
    last = [0]

    def on_checkpoint(step: int) -> None:
        if step in snapshots:
            taken[step] = _state(model)
        if tick is not None:
            tick(step - last[0])
        last[0] = step

    def begin(step: int) -> None:
        step_now[0] = step

    def end(loss: torch.Tensor) -> None:
        losses[step_now[0]] = loss.detach()

    on_checkpoint(0)
    events = TrainEvents(log=rows.append, checkpoint=on_checkpoint, begin_step=begin, end_step=end)
    diverged_at = None
    try:
        train(model, job.train_xy, job.val_xy, config, events=events, progress=False)
    except TrainingDiverged:
        diverged_at = int((~torch.isfinite(losses)).nonzero()[0])
        if tick is not None:
            tick(config.steps - last[0])
    final = [float("nan")] * 2 if diverged_at is not None else [evaluate(model, *job.final_train),
                                                                evaluate(model, *job.final_val)]
    return {"train_loss": final[0], "val_loss": final[1], "rows": rows, "diverged_at": diverged_at,
            "snapshots": taken, "state": _state(model) if job.keep_models else None}


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _result(run: SweepRun, output: dict[str, Any], vocab_size: int, stacked: bool) -> SweepResult:
    diverged = output["diverged_at"]
    nan = float("nan")
    return SweepResult(
        name=run.name,
        train_loss=nan if diverged is not None else output["train_loss"],
        val_loss=nan if diverged is not None else output["val_loss"],
        rows=output["rows"], diverged_at=diverged, seconds=output["seconds"], stacked=stacked,
        model=_rebuild(run, output["state"], vocab_size) if output["state"] is not None else None,
        snapshots={step: _rebuild(run, state, vocab_size) for step, state in sorted(output["snapshots"].items())})


def _rebuild(run: SweepRun, state: dict[str, torch.Tensor], vocab_size: int) -> LanguageModel:
    model = build_model(run.model, vocab_size, seed=run.train.seed)
    if run.prepare is not None:
        run.prepare(model)
    model.load_state_dict(state)
    return model


def _bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="step", desc="sweep", dynamic_ncols=True, smoothing=0.1)


# ------------------------------------------------------------------------------------------------ processes
def _in_this_process(chunks: list[_Chunk], job: _Job, bar: Any) -> list[list[dict[str, Any]]]:
    """Train the chunks one after the other here, with one thread (the thread setting is restored after)."""
    with torch_threads(1):
        return [_train_chunk(chunk, job, bar.update if bar is not None else None) for chunk in chunks]


_worker_job: _Job | None = None
_worker_queue: Any = None


def _init_worker(job: _Job, queue: Any) -> None:
    global _worker_job, _worker_queue
    torch.set_num_threads(1)
    _worker_job, _worker_queue = job, queue


def _worker_train(chunk: _Chunk) -> list[dict[str, Any]]:
    return _train_chunk(chunk, _worker_job, _worker_queue.put)


def _in_processes(chunks: list[_Chunk], job: _Job, processes: int, bar: Any) -> list[list[dict[str, Any]]]:
    """Train the chunks in `processes` spawned workers, feeding their step counts to the progress bar."""
    import multiprocessing
    import queue as queues
    from concurrent.futures import ProcessPoolExecutor, wait

    context = multiprocessing.get_context("spawn")  # fork is unsafe once torch has started its thread pools
    ticks = context.Queue()
    with ProcessPoolExecutor(processes, mp_context=context, initializer=_init_worker,
                             initargs=(job, ticks)) as pool:
        futures = [pool.submit(_worker_train, chunk) for chunk in chunks]
        pending = set(futures)
        while pending:
            _, pending = wait(pending, timeout=0.2)
            while True:
                try:
                    count = ticks.get_nowait()
                except queues.Empty:
                    break
                if bar is not None:
                    bar.update(count)
        if bar is not None:
            bar.update(bar.total - bar.n)  # ticks still in the queue when the last chunk finished
        return [future.result() for future in futures]
