"""Words, the character vocabulary, context windows and the train/val/test split.

The flow of the lesson: a file of words (one per line) becomes a vocabulary of characters with `.` as the
boundary token at index 0; every word becomes `len(word) + 1` examples, each a window of the previous
`block_size` characters (padded with `.`) and the character that follows.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from normlab.errors import DataError

BOUNDARY = "."
BUNDLED_NAMES = "names.txt"


def bundled_path(name: str = BUNDLED_NAMES) -> Path:
    """Path of a word list shipped inside the package (see `normlab/datasets/SOURCE.md`)."""
    return Path(str(resources.files("normlab.datasets").joinpath(name)))


def load_words(path: str | Path | None = None) -> list[str]:
    """Read one word per line from a UTF-8 file (the bundled names when `path` is None).

    A byte-order mark at the start (as some editors write) is dropped; surrounding whitespace is stripped and
    blank lines are skipped. Raises `DataError` for a missing, empty or
    undecodable file, for a file with no words, and for words that contain the boundary token `.`.
    """
    path = bundled_path() if path is None else Path(path)
    if not path.is_file():
        raise DataError(f"words file {str(path)!r} does not exist (or is not a file): give a UTF-8 text file "
                        "with one word per line")
    raw = path.read_bytes()
    if not raw:
        raise DataError(f"words file {str(path)!r} is empty: it needs one word per line")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise DataError(f"words file {str(path)!r} is not valid UTF-8 (line {line}, byte {error.start}): "
                        "save it as UTF-8") from None
    text = text.removeprefix("\ufeff")
    words, bad_lines = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        word = line.strip()
        if BOUNDARY in word:
            bad_lines.append(number)
        elif word:
            words.append(word)
    if bad_lines:
        shown = ", ".join(map(str, bad_lines[:10])) + (" ..." if len(bad_lines) > 10 else "")
        raise DataError(f"words file {str(path)!r}: {len(bad_lines)} line(s) contain {BOUNDARY!r}, which normlab "
                        f"reserves as the word boundary (lines {shown}): remove or replace that character")
    if not words:
        raise DataError(f"words file {str(path)!r} has no usable lines (only whitespace): it needs one word "
                        "per line")
    return words


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass(frozen=True)
class Vocab:
    """Characters and their indices; `itos[0]` is the boundary token `.`."""

    itos: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.itos or self.itos[0] != BOUNDARY:
            raise DataError(f"a vocabulary must start with the boundary token {BOUNDARY!r}, got {self.itos[:3]!r}")
        if len(set(self.itos)) != len(self.itos) or any(len(ch) != 1 for ch in self.itos):
            raise DataError("a vocabulary must list distinct single characters")

    @classmethod
    def from_words(cls, words: list[str]) -> Vocab:
        """The sorted set of characters in `words`, after the boundary token."""
        return cls((BOUNDARY, *sorted(set("".join(words)))))

    @property
    def stoi(self) -> dict[str, int]:
        """Character to index."""
        return {ch: i for i, ch in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, word: str) -> list[int]:
        """Indices of the characters of `word` (no boundary tokens added)."""
        stoi = self.stoi
        return [stoi[ch] for ch in word]

    def decode(self, indices: list[int]) -> str:
        """The characters of `indices`, boundary tokens dropped."""
        return "".join(self.itos[i] for i in indices if i != 0)

    def check_words(self, words: list[str], source: str = "words") -> None:
        """Raise `DataError` listing every character of `words` that this vocabulary lacks, with line numbers."""
        known = set(self.itos)
        missing: dict[str, list[int]] = {}
        for number, word in enumerate(words, start=1):
            for ch in sorted(set(word) - known):
                missing.setdefault(ch, []).append(number)
        if missing:
            parts = []
            for ch, lines in sorted(missing.items()):
                shown = ", ".join(map(str, lines[:5])) + (" ..." if len(lines) > 5 else "")
                parts.append(f"{ch!r} (word {shown})")
            raise DataError(f"{source}: {len(missing)} character(s) not in the run's vocabulary: "
                            f"{'; '.join(parts)}. Remove them, or train a new run on data that includes them")

    def to_json(self) -> str:
        """JSON text for `vocab.json`."""
        return json.dumps({"itos": list(self.itos)}, ensure_ascii=False, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Vocab:
        """Inverse of `to_json`; raises `DataError` on malformed input."""
        try:
            itos = json.loads(text)["itos"]
        except (ValueError, KeyError, TypeError) as error:
            raise DataError(f"vocab.json is malformed ({error}): it must be a JSON object with a list 'itos'") from None
        if not isinstance(itos, list) or not all(isinstance(ch, str) for ch in itos):
            raise DataError("vocab.json is malformed: 'itos' must be a list of characters")
        return cls(tuple(itos))


def build_dataset(words: list[str], vocab: Vocab, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Context windows of every word: X (N, block_size) int64 and Y (N,) int64, as in the lesson.

    Word by word, `block_size` boundary tokens, the word and one more boundary token: every character after the
    leading boundaries is a target, the `block_size` before it its context (so no window crosses two words).
    """
    if block_size < 1:
        raise DataError(f"block_size must be at least 1, got {block_size}")
    if not words:
        return torch.zeros((0, block_size), dtype=torch.long), torch.zeros(0, dtype=torch.long)
    stoi = vocab.stoi
    text = "".join(BOUNDARY * block_size + word + BOUNDARY for word in words)
    codes = np.fromiter((stoi[ch] for ch in text), dtype=np.int64, count=len(text))
    lengths = np.fromiter((len(word) + 1 for word in words), dtype=np.int64, count=len(words))
    starts = np.cumsum(lengths + block_size) - lengths  # where each word's first target sits
    targets = np.repeat(starts - np.cumsum(np.concatenate(([0], lengths[:-1]))), lengths) + np.arange(lengths.sum())
    windows = np.lib.stride_tricks.sliding_window_view(codes, block_size)  # windows[i] = codes[i:i + block_size]
    return torch.from_numpy(windows[targets - block_size].copy()), torch.from_numpy(codes[targets].copy())


def split_words(words: list[str], seed: int = 42) -> tuple[list[str], list[str], list[str]]:
    """Shuffle a copy with `random.Random(seed)` and cut 80/10/10, as the lesson does with `random.seed(42)`."""
    shuffled = list(words)
    random.Random(seed).shuffle(shuffled)
    n1, n2 = int(0.8 * len(shuffled)), int(0.9 * len(shuffled))
    return shuffled[:n1], shuffled[n1:n2], shuffled[n2:]


def random_subset(xy: tuple[torch.Tensor, torch.Tensor], limit: int | None, generator: torch.Generator
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """At most `limit` examples of (X, Y) drawn without replacement by `generator` (all of them, in order and
    without a draw, when there are no more than `limit` or `limit` is None): the same subset for the same
    generator state, e.g. to evaluate on the same examples at every step."""
    x, y = xy
    if limit is None or len(x) <= limit:
        return x, y
    keep = torch.randperm(len(x), generator=generator)[:limit]
    return x[keep], y[keep]


def random_batch(xy: tuple[torch.Tensor, torch.Tensor], size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`size` examples of (X, Y) drawn with replacement from a generator seeded with `seed`."""
    x, y = xy
    index = torch.randint(0, len(x), (size,), generator=torch.Generator().manual_seed(seed))
    return x[index], y[index]


@dataclass
class Splits:
    """The three splits as tensors, plus the words of the training split (for novelty of samples)."""

    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    train_words: list[str]

    def get(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The (X, Y) pair of `split`, one of train, val, test."""
        if split not in ("train", "val", "test"):
            raise DataError(f"unknown split {split!r}: choose train, val or test")
        return getattr(self, split)


def make_splits(words: list[str], vocab: Vocab, block_size: int, split_seed: int = 42) -> Splits:
    """Split `words` 80/10/10 and build the context windows of each split."""
    train, val, test = split_words(words, split_seed)
    if not train:
        raise DataError(f"{len(words)} word(s) are too few to split 80/10/10: give at least 2 words")
    return Splits(
        train=build_dataset(train, vocab, block_size),
        val=build_dataset(val, vocab, block_size),
        test=build_dataset(test, vocab, block_size),
        train_words=train,
    )
