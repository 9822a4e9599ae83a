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


class TorchDropout(torch.nn.Module):
    """torch's own dropout with torch's global generator seeded `self.seed` for each call (and restored after): the
    independent reference that replays normlab's Dropout layers."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p, self.seed = p, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return torch.nn.functional.dropout(x, self.p, training=self.training)


def with_torch_dropout(model: torch.nn.Module) -> list[TorchDropout]:
    """Replace every normlab Dropout of `model` by a `TorchDropout` in place; the replacements, in model order."""
    from normlab import nn

    replaced = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Dropout):
                setattr(parent, name, TorchDropout(child.p))
                replaced.append(getattr(parent, name))
    return replaced
