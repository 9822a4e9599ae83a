"""What every run's step depends on, as pure functions of the configuration and the step: the learning rate and
the batch.

Batches come in tables: the batch indices of `table_steps(batch_size)` consecutive steps (65,536 indices) are
drawn at once from a generator seeded with (seed, table number), so the batch of a step is a pure function of
(seed, step) and a resumed run draws exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from normlab.config import TrainConfig

TABLE_INDICES = 2**16  # batch indices drawn at once


def learning_rate(config: TrainConfig, step: int) -> float:
    """The learning rate of `step` (0-based) under the configured warm-up and schedule."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "step":
        return config.lr if step < config.decay_step else config.lr * config.lr_decay_factor
    if config.schedule == "cosine":
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        floor = config.lr * config.min_lr_factor
        return floor + 0.5 * (config.lr - floor) * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return config.lr


def learning_rates(configs: Sequence[TrainConfig], start: int, count: int) -> torch.Tensor:
    """The learning rates (count, M) float64 of steps start..start+count-1 for each of the M configs."""
    return torch.tensor([[learning_rate(config, step) for config in configs] for step in range(start, start + count)],
                        dtype=torch.float64)


def table_steps(batch_size: int) -> int:
    """Steps per batch table."""
    return max(1, TABLE_INDICES // batch_size)


def batch_table(seed: int, table: int, num_examples: int, batch_size: int) -> torch.Tensor:
    """The batch indices (table_steps, batch_size) into the training split of table number `table` (steps
    table·table_steps onwards): a pure function of its arguments."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + table) % 2**63)
    return torch.randint(0, num_examples, (table_steps(batch_size), batch_size), generator=generator)


def batch_indices(seed: int, step: int, num_examples: int, batch_size: int) -> torch.Tensor:
    """The batch indices (batch_size,) of one step (drawing its whole table: use `batch_table` in loops)."""
    steps = table_steps(batch_size)
    return batch_table(seed, step // steps, num_examples, batch_size)[step % steps]
