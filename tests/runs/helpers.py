"""Helpers of the run-directory tests: where a run's checkpoint files are, and comparing tensors bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file


def checkpoint_file(run: Path, name: str = "model.safetensors") -> Path:
    """The file `name` of the run's current checkpoint, found from `checkpoint.json` (read here as plain JSON)."""
    pointer = json.loads((Path(run) / "checkpoint.json").read_text())
    return Path(run) / pointer["directory"] / name


def assert_same_tensors(path: Path, other: Path) -> None:
    """The two safetensors files hold the same keys and bit-identical tensors."""
    a, b = load_file(path), load_file(other)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), (path.name, key)


def assert_same_checkpoint(run: Path, other: Path) -> None:
    """The two runs' current weights and optimizer states are bit-identical."""
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert_same_tensors(checkpoint_file(run, name), checkpoint_file(other, name))
