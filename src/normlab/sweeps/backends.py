"""Where the lockstep groups of a sweep train: in this process, in local worker processes, or as Ray tasks.

Groups train with one thread each: measured on this project's 2-core machine (24 lesson-sized runs x 3,000
steps in four groups), one process took 22.3 s with one thread and 22.8 s with two, and two one-thread worker
processes took 13.7 s, start-up included; with the other core busy, two threads in one process ran up to 5x
slower than one. A backend has one method, `train_groups(groups, job, tick) -> outputs`, so that other
executors plug in beside these: `RayBackend` sends each group to a Ray cluster (or a local Ray instance) as one
task, where it trains exactly as it would here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from normlab.errors import ConfigError
from normlab.sweeps.runner import Group, Job, train_group
from normlab.training.threads import torch_threads

Outputs = list[list[dict[str, Any]]]


class LocalBackend:
    """`processes` = 1: the groups train here one after the other; more: in that many spawned worker processes,
    their step counts fed to the progress bar."""

    def __init__(self, processes: int = 1) -> None:
        self.processes = max(1, processes)

    def train_groups(self, groups: Sequence[Group], job: Job, tick: Callable[[int], Any] | None) -> Outputs:
        """Each group's outputs (one dict per run), in the order of `groups`."""
        if self.processes == 1 or len(groups) == 1:
            with torch_threads(1):
                return [train_group(group, job, tick) for group in groups]
        return _in_processes(groups, job, self.processes, tick)


_worker_job: Job | None = None
_worker_queue: Any = None


def _init_worker(job: Job, queue: Any) -> None:
    global _worker_job, _worker_queue
    torch.set_num_threads(1)
    _worker_job, _worker_queue = job, queue


def _worker_train(group: Group) -> list[dict[str, Any]]:
    return train_group(group, _worker_job, _worker_queue.put)


def _in_processes(groups: Sequence[Group], job: Job, processes: int, tick: Callable[[int], Any] | None) -> Outputs:
    import multiprocessing
    import queue as queues
    from concurrent.futures import ProcessPoolExecutor, wait

    context = multiprocessing.get_context("spawn")  # fork is unsafe once torch has started its thread pools
    ticks = context.Queue()
    with ProcessPoolExecutor(processes, mp_context=context, initializer=_init_worker,
                             initargs=(job, ticks)) as pool:
        futures = [pool.submit(_worker_train, group) for group in groups]
        pending = set(futures)
        while pending:
            _, pending = wait(pending, timeout=0.2)
            while True:
                try:
                    count = ticks.get_nowait()
                except queues.Empty:
                    break
                if tick is not None:
                    tick(count)
        return [future.result() for future in futures]


class RayBackend:
    """Each lockstep group as one Ray task of one CPU (`ray.remote`), on the cluster at `address` or, with None, on
    a local Ray instance started for the sweep (with `num_cpus` CPUs; None: all). `init_options` go to
    `ray.init` (e.g. `runtime_env` to ship normlab to a cluster whose workers lack it). Progress ticks come as
    each group finishes. Needs `pip install normlab[ray]`."""

    def __init__(self, address: str | None = None, *, num_cpus: int | None = None, **init_options: Any) -> None:
        self.address, self.num_cpus, self.init_options = address, num_cpus, init_options

    def train_groups(self, groups: Sequence[Group], job: Job, tick: Callable[[int], Any] | None) -> Outputs:
        """Each group's outputs (one dict per run), in the order of `groups`."""
        ray = _import_ray()
        started = not ray.is_initialized()
        if started:
            local = {"num_cpus": self.num_cpus} if self.address is None else {}
            ray.init(address=self.address, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
                     **local, **self.init_options)
        try:
            task = ray.remote(num_cpus=1)(_train_group_task)
            job_ref = ray.put(job)  # sent once, shared by every task
            pending = {task.remote(group, job_ref): group for group in groups}
            futures = list(pending)
            while pending:
                finished, _ = ray.wait(list(pending), num_returns=1)
                group = pending.pop(finished[0])
                if tick is not None:
                    tick(len(group.runs) * group.runs[0].train.steps)
            return ray.get(futures)
        finally:
            if started:
                ray.shutdown()


def _train_group_task(group: Group, job: Job) -> list[dict[str, Any]]:
    """One Ray task: a group trained with one thread, as in a local worker process."""
    with torch_threads(1):
        return train_group(group, job, None)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray needs Ray: pip install 'normlab[ray]' (or pip install ray)") from None
    return ray
