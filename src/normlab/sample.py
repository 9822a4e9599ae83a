"""Sampling words from a trained model with temperature and top-k, and the diversity of what comes out."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from normlab.data import Vocab
from normlab.errors import ConfigError, NonFiniteError

MAX_LENGTH = 50  # characters; a word that has not ended by then is cut
MAX_SAMPLES = 1_000_000  # words per call
CHUNK = 16_384  # words drawn at once: memory stays bounded whatever `n`


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
                 seed: int = 0, block_size: int | None = None, greedy: bool = False) -> Samples:
    """Draw `n` words in eval mode, each starting from an all-boundary context; with `greedy`, take the most
    likely character at every position instead of drawing one (every word is then the same).

    A word ends at the boundary token `.` or after `MAX_LENGTH` characters. The same seed gives the same words.
    Words are drawn `CHUNK` at a time from one generator; `mean_entropy` is that of the distributions (with
    temperature and top-k) the characters came from.
    """
    check_sampling_options(temperature, top_k, len(vocab))
    if not 1 <= n <= MAX_SAMPLES:
        raise ConfigError(f"the number of samples must be between 1 and {MAX_SAMPLES:,}, got {n}")
    block_size = block_size or model.block_size
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    words, entropy_sum, characters = [], 0.0, 0
    try:
        for start in range(0, n, CHUNK):
            chunk, chunk_entropy, chunk_characters = _sample_chunk(model, min(CHUNK, n - start), block_size,
                                                                   temperature, top_k, generator, greedy)
            words += [vocab.decode(row.tolist()) for row in chunk]  # boundary tokens (and padding) dropped
            entropy_sum += chunk_entropy
            characters += chunk_characters
    finally:
        model.train(was_training)
    return Samples(words, entropy_sum / max(1, characters))


def _sample_chunk(model: torch.nn.Module, n: int, block_size: int, temperature: float, top_k: int | None,
                  generator: torch.Generator, greedy: bool) -> tuple[torch.Tensor, float, int]:
    """Tokens (n, MAX_LENGTH) of `n` words, and the entropy sum and count of the characters drawn."""
    device = next(model.parameters()).device
    context = torch.zeros((n, block_size), dtype=torch.long)
    out = torch.zeros((n, MAX_LENGTH), dtype=torch.long)
    alive = torch.ones(n, dtype=torch.bool)
    entropy_sum, characters = 0.0, 0
    for position in range(MAX_LENGTH):
        probs = next_token_distribution(model(context.to(device)).float().cpu(), temperature, top_k)
        if not torch.isfinite(probs).all():
            raise NonFiniteError("the model's output probabilities are NaN or Inf, so nothing can be sampled: its "
                                 "weights are damaged or diverged")
        entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)
        entropy_sum += float(entropy[alive].sum())
        characters += int(alive.sum())
        if greedy:
            token = probs.argmax(-1)
        else:
            token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        token = torch.where(alive, token, torch.zeros_like(token))
        out[:, position] = token
        context = torch.cat([context[:, 1:], token[:, None]], dim=1)
        alive &= token != 0
        if not alive.any():
            break
    return out, entropy_sum, characters


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
