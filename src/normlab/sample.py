"""Sampling words from a trained model with temperature and top-k, and the diversity of what comes out."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from normlab.data import Vocab
from normlab.errors import ConfigError

MAX_LENGTH = 50  # characters; a word that has not ended by then is cut


def check_sampling_options(temperature: float, top_k: int | None, vocab_size: int) -> None:
    """Raise `ConfigError` for a temperature that is not positive or a top-k outside 1..vocab_size."""
    if not temperature > 0:
        raise ConfigError(f"temperature must be greater than 0, got {temperature}: use e.g. 1.0 to sample the "
                          "model's distribution, below 1 to sharpen it, above 1 to flatten it")
    if top_k is not None and not 1 <= top_k <= vocab_size:
        raise ConfigError(f"top_k must be between 1 and the vocabulary size {vocab_size}, got {top_k}")


def next_token_distribution(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None) -> torch.Tensor:
    """Probabilities (B, V) from logits (B, V): divided by `temperature`, all but the `top_k` largest zeroed."""
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.softmax(logits, dim=-1)


@dataclass
class Samples:
    """Sampled words and the mean entropy (nats) of the distributions each character was drawn from."""

    words: list[str]
    mean_entropy: float


@torch.no_grad()
def sample_words(model: torch.nn.Module, vocab: Vocab, n: int, *, temperature: float = 1.0, top_k: int | None = None,
                 seed: int = 0, block_size: int | None = None) -> Samples:
    """Draw `n` words in eval mode, all at once, each starting from an all-boundary context.

    A word ends at the boundary token `.` or after `MAX_LENGTH` characters. The same seed gives the same words.
    """
    check_sampling_options(temperature, top_k, len(vocab))
    if n < 1:
        raise ConfigError(f"the number of samples must be at least 1, got {n}")
    block_size = block_size or model.block_size
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    context = torch.zeros((n, block_size), dtype=torch.long)
    out = torch.zeros((n, MAX_LENGTH), dtype=torch.long)
    alive = torch.ones(n, dtype=torch.bool)
    entropy_sum, characters = 0.0, 0
    try:
        for position in range(MAX_LENGTH):
            probs = next_token_distribution(model(context.to(device)).float().cpu(), temperature, top_k)
            entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)
            entropy_sum += float(entropy[alive].sum())
            characters += int(alive.sum())
            token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            token = torch.where(alive, token, torch.zeros_like(token))
            out[:, position] = token
            context = torch.cat([context[:, 1:], token[:, None]], dim=1)
            alive &= token != 0
            if not alive.any():
                break
    finally:
        model.train(was_training)
    words = [vocab.decode(row.tolist()) for row in out]  # boundary tokens (and the padding after) dropped
    return Samples(words, entropy_sum / max(1, characters))


@dataclass
class Diversity:
    """How varied a set of samples is."""

    mean_entropy: float  # nats per character, of the sampling distributions
    share_unique: float  # distinct words / words
    share_novel: float  # words not in the training split / words
    mean_length: float  # characters per word

    def lines(self) -> list[str]:
        """Human-readable lines."""
        return [f"mean entropy per character: {self.mean_entropy:.3f} nats",
                f"unique: {self.share_unique:.1%}   not in training data: {self.share_novel:.1%}   "
                f"mean length: {self.mean_length:.2f}"]


def diversity(samples: Samples, train_words: list[str] | set[str]) -> Diversity:
    """Diversity of `samples` against the training words."""
    words = samples.words
    known = set(train_words)
    return Diversity(
        mean_entropy=samples.mean_entropy,
        share_unique=len(set(words)) / len(words),
        share_novel=sum(word not in known for word in words) / len(words),
        mean_length=sum(map(len, words)) / len(words),
    )
