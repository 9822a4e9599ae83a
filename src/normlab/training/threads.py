"""How many torch threads a run uses.

Lesson-sized work spends its time in small operations whose threads synchronise more than they compute: on this
project's 2-core machine one thread is as fast as two up to about 2**17 hidden activations per step (models ×
batch × width; 20 lesson models at batch 32), and far faster when another process is busy (a lesson-sized
reference run fell from ~900 to 25 steps/s on two threads with the other core loaded). Above it the second
thread pays (32 lesson models: 1.6x).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from normlab.config import ModelConfig

ONE_THREAD_MAX_WORK = 2**17


def work_per_step(models: Sequence[ModelConfig], batch_size: int) -> int:
    """Models × batch × width: how much a step of these models computes, to choose threads and compilation."""
    return len(models) * batch_size * max(model.n_hidden for model in models)


def threads_for(work_per_step: int) -> int | None:
    """One thread for up to `ONE_THREAD_MAX_WORK` hidden activations per step, else None (torch's default)."""
    return 1 if work_per_step <= ONE_THREAD_MAX_WORK else None


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run the block with `count` torch intra-op threads (None: leave the setting alone), then restore it."""
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
