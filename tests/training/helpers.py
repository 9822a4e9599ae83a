"""Tiny data and configurations shared by the training tests."""

from __future__ import annotations

import torch

VOCAB = 27


def random_examples(n: int, seed: int, block_size: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` random (context, next character) pairs over a vocabulary of 27."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(0, VOCAB, (n, block_size), generator=generator),
            torch.randint(0, VOCAB, (n,), generator=generator))


TRAIN_XY, VAL_XY = random_examples(800, 0), random_examples(200, 1)
