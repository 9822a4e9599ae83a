"""Words, vocabulary, context windows and splits, against the bundled file's checksum and hand-worked cases."""

from __future__ import annotations

import hashlib
import random
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from normlab.data import Vocab, build_dataset, bundled_path, load_words, make_splits, split_words
from normlab.errors import DataError

BUNDLED_SHA256 = "3b20b43df36ec7ee9c90f8ea2c6f1a5310ad2a8608b06f5208edbbf544f26c35"  # from datasets/SOURCE.md


def test_bundled_names_match_their_recorded_checksum():
    data = bundled_path().read_bytes()
    assert hashlib.sha256(data).hexdigest() == BUNDLED_SHA256
    words = load_words()
    assert len(words) == 29_910 == len(set(words))
    assert set("".join(words)) == set("abcdefghijklmnopqrstuvwxyz")


def test_vocab_puts_the_boundary_first_and_sorts_the_rest():
    vocab = Vocab.from_words(["emma", "bob"])
    assert vocab.itos == (".", "a", "b", "e", "m", "o")
    assert vocab.encode("mob") == [4, 5, 2]
    assert vocab.decode([4, 5, 2, 0, 0]) == "mob"
    assert Vocab.from_json(vocab.to_json()) == vocab


def test_context_windows_of_emma_are_the_lessons():
    vocab = Vocab.from_words(["emma"])  # . a e m
    x, y = build_dataset(["emma"], vocab, block_size=3)
    # ... -> e, ..e -> m, .em -> m, emm -> a, mma -> .
    assert x.tolist() == [[0, 0, 0], [0, 0, 2], [0, 2, 3], [2, 3, 3], [3, 3, 1]]
    assert y.tolist() == [2, 3, 3, 1, 0]
    assert x.dtype == y.dtype == torch.long


def test_split_reproduces_the_lessons_global_random_shuffle():
    words = [f"w{i}" for i in range(1000)]
    expected = list(words)
    random.seed(42)
    random.shuffle(expected)
    train, val, test = split_words(words, seed=42)
    assert train == expected[:800] and val == expected[800:900] and test == expected[900:]
    assert split_words(words, seed=7)[0] != train


def test_make_splits_counts_one_example_per_character_plus_the_end(words_file):
    words = load_words(words_file)
    vocab = Vocab.from_words(words)
    splits = make_splits(words, vocab, block_size=3)
    total = sum(len(split[0]) for split in (splits.train, splits.val, splits.test))
    assert total == sum(len(w) + 1 for w in words)
    assert len(splits.train_words) == int(0.8 * len(words))


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"  \n\n \t\n", "has no usable lines"),
    (b"emma\nst.john\n", "reserves as the word boundary (lines 2)"),
    (b"emma\n\xff\xfe\n", "not valid UTF-8 (line 2"),
])
def test_bad_word_files_raise_one_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match=re.escape(message)):
        load_words(path)


def test_missing_words_file_is_named(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_words(tmp_path / "nope.txt")


def test_characters_missing_from_the_vocab_are_listed_with_their_lines():
    vocab = Vocab.from_words(["abc"])
    with pytest.raises(DataError, match=r"'x' \(word 2, 3\); 'z' \(word 3\)"):
        vocab.check_words(["abc", "xa", "zx"])


def test_malformed_vocab_json_is_rejected():
    with pytest.raises(DataError, match="malformed"):
        Vocab.from_json('{"chars": []}')
    with pytest.raises(DataError, match="boundary"):
        Vocab.from_json('{"itos": ["a", "b"]}')


def test_a_byte_order_mark_is_not_a_character(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeffemma\nbob\n".encode())  # as Notepad writes UTF-8
    assert load_words(path) == ["emma", "bob"]
    assert "\ufeff" not in Vocab.from_words(load_words(path)).itos


def _lesson_build_dataset(words, vocab, block_size):
    """The lesson's loop, character by character: the reference for the vectorised `build_dataset`."""
    stoi, xs, ys = vocab.stoi, [], []
    for word in words:
        context = [0] * block_size
        for ch in word + ".":
            xs.append(context)
            ys.append(stoi[ch])
            context = context[1:] + [stoi[ch]]
    return torch.tensor(xs, dtype=torch.long).view(-1, block_size), torch.tensor(ys, dtype=torch.long)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet="abcxyzé", min_size=1, max_size=12), max_size=20), st.integers(1, 9))
def test_context_windows_equal_the_lessons_loop(words, block_size):
    vocab = Vocab.from_words(words or ["a"])
    x, y = build_dataset(words, vocab, block_size)
    expected_x, expected_y = _lesson_build_dataset(words, vocab, block_size)
    assert torch.equal(x, expected_x) and torch.equal(y, expected_y)
