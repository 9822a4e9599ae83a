"""Where the lockstep groups of a sweep train: in this process, or in local worker processes.

Groups train with one thread each: measured on this project's 2-core machine (24 lesson-sized runs x 3,000
steps in four groups), one process took 22.3 s with one thread and 22.8 s with two, and two one-thread worker
processes took 13.7 s, start-up included; with the other core busy, two threads in one process ran up to 5x
slower than one. A backend has one method, `train_groups(groups, job, tick) -> outputs`, so that other
executors (a cluster) plug in beside these.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

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
