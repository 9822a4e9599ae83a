"""Dropout written out, a drop-in twin of torch.nn.Dropout whose masks come from an explicit generator."""

import torch
from torch import nn


class Dropout(nn.Module):
    """Inverted dropout, equal to torch.nn.Dropout: in training mode each element is zeroed with probability `p`
    and the survivors are scaled by 1/(1 − p), so the expected output is the input; in eval mode the input passes
    through unchanged. Any shape (*) → (*).

    The mask is drawn with `bernoulli_(1 − p)` and divided by 1 − p before it multiplies the input, as torch
    does on the CPU, so for the same generator state the output equals torch's bit for bit. It comes from
    `generator` when one is set (a `torch.Generator` on the input's device), else from torch's global generator
    as torch's own Dropout. normlab's models give every Dropout its own generator and reseed it each step (see
    `normlab.model.seed_dropout`), so a run's masks are a pure function of its seed and the step.
    """

    def __init__(self, p: float = 0.5, inplace: bool = False, *, generator: torch.Generator | None = None) -> None:
        if p < 0 or p > 1:
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
        super().__init__()
        self.p = p
        self.inplace = inplace
        self.generator = generator

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """x · mask / (1 − p) with mask ~ Bernoulli(1 − p) elementwise in training mode; x in eval mode."""
        if not self.training or self.p == 0:
            return input
        if self.p == 1:
            scale = torch.zeros_like(input)  # torch's p = 1: all zeros, with no draw
        else:
            scale = torch.empty_like(input).bernoulli_(1 - self.p, generator=self.generator).div_(1 - self.p)
        return input.mul_(scale) if self.inplace else input * scale

    def extra_repr(self) -> str:
        """torch's description: p and inplace."""
        return f"p={self.p}, inplace={self.inplace}"
