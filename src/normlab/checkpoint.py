"""The run directory: config, vocabulary, weights, optimizer state and metrics, in safetensors and JSON.

    RUN/config.json            the RunConfig
    RUN/vocab.json             {"itos": [".", "a", ...]}
    RUN/model.safetensors      the model's state_dict; metadata: format, step
    RUN/optimizer.safetensors  the optimizer's tensors; metadata: format, step, the rest of its state as JSON
    RUN/metrics.jsonl          one JSON object a line: periodic losses, then {"event": "final", ...}

Every file is written to a temporary name and moved into place with `os.replace`, so a crash or Ctrl-C never
leaves a half-written file where a good one was. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from normlab.config import RunConfig
from normlab.data import Vocab
from normlab.errors import CheckpointError, NormlabError
from normlab.files import atomic_write
from normlab.model import LanguageModel, build_model

CONFIG, VOCAB, MODEL, OPTIMIZER, METRICS = (
    "config.json", "vocab.json", "model.safetensors", "optimizer.safetensors", "metrics.jsonl")
MODEL_FORMAT, OPTIMIZER_FORMAT = "normlab-model-1", "normlab-optimizer-1"


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; `CheckpointError` if it is missing or corrupted."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the run directory holds no weights (training was interrupted, or "
                              "diverged, before its first checkpoint: see its metrics.jsonl)")
    try:
        tensors = load_safetensors(path.read_bytes())
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
    except Exception as error:  # safetensors raises its own error types for every kind of corruption
        raise CheckpointError(f"{path} is corrupted and cannot be read ({type(error).__name__}: {error}); "
                              "restore it from a backup or train again") from None
    return tensors, metadata


def _optimizer_to_safetensors(optimizer: torch.optim.Optimizer, step: int) -> bytes:
    state = optimizer.state_dict()
    tensors, other = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value.detach().contiguous().clone()
            else:
                other[f"{index}.{key}"] = value
    metadata = {"format": OPTIMIZER_FORMAT, "step": str(step), "class": type(optimizer).__name__,
                "param_groups": json.dumps(state["param_groups"]), "state": json.dumps(other)}
    return save_safetensors(tensors, metadata=metadata)


def _optimizer_state_from(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = tensor
    for name, value in json.loads(metadata["state"]).items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": json.loads(metadata["param_groups"])}


@dataclass
class RunDir:
    """A run directory on disk, with its config and vocabulary loaded and checked."""

    path: Path
    config: RunConfig
    vocab: Vocab

    @classmethod
    def create(cls, path: str | Path, config: RunConfig, vocab: Vocab) -> RunDir:
        """Make a new run directory; refuses one that already holds files (nothing is ever overwritten)."""
        path = Path(path)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise CheckpointError(f"{path} already exists and is not empty: choose another --out, or continue "
                                  "that run with --resume")
        path.mkdir(parents=True, exist_ok=True)
        atomic_write(path / CONFIG, config.to_json())
        atomic_write(path / VOCAB, vocab.to_json())
        return cls(path, config, vocab)

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        """Open an existing run directory; `CheckpointError` if it is missing or its config/vocab are bad."""
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"run directory {path} does not exist: give the --out of a `normlab train`")
        for name in (CONFIG, VOCAB):
            if not (path / name).is_file():
                raise CheckpointError(f"{path / name} is missing: {path} is not a normlab run directory")
        try:
            config = RunConfig.from_json((path / CONFIG).read_text(encoding="utf-8"))
            vocab = Vocab.from_json((path / VOCAB).read_text(encoding="utf-8"))
        except (NormlabError, UnicodeDecodeError) as error:
            raise CheckpointError(f"{path}: {error}") from None
        return cls(path, config, vocab)

    def save_checkpoint(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, step: int) -> None:
        """Write the optimizer state, then the model, each atomically, both stamped with `step`."""
        if optimizer is not None:
            atomic_write(self.path / OPTIMIZER, _optimizer_to_safetensors(optimizer, step))
        self.save_model(model, step)

    def save_model(self, model: torch.nn.Module, step: int, **metadata: str) -> None:
        """Write `model.safetensors` atomically."""
        tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        meta = {"format": MODEL_FORMAT, "step": str(step), **metadata}
        atomic_write(self.path / MODEL, save_safetensors(tensors, metadata=meta))

    def model_step(self) -> int:
        """The step stamped on `model.safetensors`."""
        return int(_read_safetensors(self.path / MODEL)[1].get("step", "0"))

    def load_model(self, device: str = "cpu") -> tuple[LanguageModel, int]:
        """Build the model of `config.json` and load `model.safetensors` into it; returns (model, step)."""
        tensors, metadata = _read_safetensors(self.path / MODEL)
        if metadata.get("format") != MODEL_FORMAT:
            raise CheckpointError(f"{self.path / MODEL} is not a normlab model checkpoint "
                                  f"(format {metadata.get('format')!r}, expected {MODEL_FORMAT!r})")
        model = build_model(self.config.model, len(self.vocab), seed=self.config.train.seed)
        try:
            model.load_state_dict(tensors, strict=True)
        except RuntimeError as error:
            detail = " ".join(str(error).split())
            raise CheckpointError(f"{self.path / MODEL} does not match {self.path / CONFIG}: {detail}. The "
                                  "config or the weights were changed after training; restore the pair") from None
        return model.to(device), int(metadata.get("step", "0"))

    def load_optimizer(self, optimizer: torch.optim.Optimizer, expected_step: int) -> None:
        """Load `optimizer.safetensors` into `optimizer`; its step must equal the model's."""
        tensors, metadata = _read_safetensors(self.path / OPTIMIZER)
        if metadata.get("format") != OPTIMIZER_FORMAT or metadata.get("class") != type(optimizer).__name__:
            raise CheckpointError(f"{self.path / OPTIMIZER} holds no {type(optimizer).__name__} state "
                                  "for this run's config")
        if int(metadata["step"]) != expected_step:
            raise CheckpointError(f"{self.path / OPTIMIZER} is from step {metadata['step']} but the model is from "
                                  f"step {expected_step}: the run was stopped while saving; it cannot be resumed "
                                  "exactly (the model is still usable for sample and eval)")
        try:
            optimizer.load_state_dict(_optimizer_state_from(tensors, metadata))
        except (ValueError, KeyError, RuntimeError) as error:
            raise CheckpointError(f"{self.path / OPTIMIZER} does not match the model: {error}") from None

    def append_metrics(self, row: dict[str, Any]) -> None:
        """Append one row to `metrics.jsonl`."""
        with open(self.path / METRICS, "a", encoding="utf-8") as file:
            file.write(json.dumps(row) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every row of `metrics.jsonl` (empty if there is none); unreadable lines raise `CheckpointError`."""
        path = self.path / METRICS
        if not path.is_file():
            return []
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise CheckpointError(f"{path} line {number} is not valid JSON") from None
        return rows

    def keep_metrics_until(self, step: int) -> None:
        """Drop metrics rows after `step` (and any final row), so a resumed run does not repeat them."""
        rows = [row for row in self.read_metrics() if row.get("step", 0) <= step and row.get("event") != "final"]
        atomic_write(self.path / METRICS, "".join(json.dumps(row) + "\n" for row in rows))
