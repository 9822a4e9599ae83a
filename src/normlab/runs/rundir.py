"""The run directory, the one module that knows its files: config, vocabulary, weights, optimizer state, metrics.

    RUN/config.json            the RunConfig
    RUN/vocab.json             {"itos": [".", "a", ...]}
    RUN/model.safetensors      the model's state_dict; metadata: format, step
    RUN/optimizer.safetensors  the optimizer's tensors; metadata: format, step, the rest of its state as JSON
    RUN/metrics.jsonl          one JSON object a line: periodic losses, then {"event": "final", ...}
    RUN/diagnostics/           with --diagnose: what `normlab.diagnostics` recorded
    RUN/report.html            the report

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
from normlab.model import LanguageModel, build_model, state_shapes

CONFIG, VOCAB, MODEL, OPTIMIZER, METRICS = (
    "config.json", "vocab.json", "model.safetensors", "optimizer.safetensors", "metrics.jsonl")
DIAGNOSTICS, REPORT = "diagnostics", "report.html"
OPTIMIZER_CLASSES = {"sgd": "SGD", "adamw": "AdamW"}
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


def _optimizer_to_safetensors(state: dict[str, Any], class_name: str, step: int) -> bytes:
    tensors, other = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value.detach().contiguous().clone()
            else:
                other[f"{index}.{key}"] = value
    metadata = {"format": OPTIMIZER_FORMAT, "step": str(step), "class": class_name,
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


def read_metrics(run_path: str | Path) -> list[dict[str, Any]]:
    """Every row of `RUN/metrics.jsonl` (empty if there is none); a line that is not a JSON object raises
    `CheckpointError` naming it."""
    path = Path(run_path) / METRICS
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise CheckpointError(f"{path} line {number} is not valid JSON") from None
            if not isinstance(row, dict):
                raise CheckpointError(f"{path} line {number} is not a JSON object")
            rows.append(row)
    return rows


def read_vocab_size(run_path: str | Path) -> int | None:
    """The number of symbols in `RUN/vocab.json`, or None if it is missing or unreadable (for display)."""
    try:
        itos = json.loads((Path(run_path) / VOCAB).read_text(encoding="utf-8"))["itos"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return len(itos) if isinstance(itos, list) else None


def read_config_json(run_path: str | Path) -> dict[str, Any] | None:
    """The raw JSON object of `RUN/config.json`, or None if it is missing or unreadable (for display)."""
    try:
        value = json.loads((Path(run_path) / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


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

    def save_checkpoint(self, model_state: dict[str, torch.Tensor], optimizer_state: dict[str, Any] | None,
                        step: int) -> None:
        """Write the optimizer state (torch's state-dict format), then the model's, each atomically, both stamped
        with `step`."""
        if optimizer_state is not None:
            class_name = OPTIMIZER_CLASSES[self.config.train.optimizer]
            atomic_write(self.path / OPTIMIZER, _optimizer_to_safetensors(optimizer_state, class_name, step))
        self.save_model(model_state, step)

    def save_model(self, model_state: dict[str, torch.Tensor], step: int, **metadata: str) -> None:
        """Write `model.safetensors` atomically from a state dict."""
        tensors = {k: v.detach().contiguous().cpu() for k, v in model_state.items()}
        meta = {"format": MODEL_FORMAT, "step": str(step), **metadata}
        atomic_write(self.path / MODEL, save_safetensors(tensors, metadata=meta))

    def model_step(self) -> int:
        """The step stamped on `model.safetensors`."""
        return int(_read_safetensors(self.path / MODEL)[1].get("step", "0"))

    def load_state(self) -> tuple[dict[str, torch.Tensor], int]:
        """The weights of `model.safetensors` as a state dict, and their step (no module is built). Every key,
        shape and dtype is checked against the model of `config.json` first."""
        tensors, metadata = _read_safetensors(self.path / MODEL)
        if metadata.get("format") != MODEL_FORMAT:
            raise CheckpointError(f"{self.path / MODEL} is not a normlab model checkpoint "
                                  f"(format {metadata.get('format')!r}, expected {MODEL_FORMAT!r})")
        expected = state_shapes(self.config.model, len(self.vocab))
        problems = [f"missing {key}" for key in expected if key not in tensors]
        problems += [f"unexpected {key}" for key in tensors if key not in expected]
        problems += [f"{key} is {tuple(tensors[key].shape)} {tensors[key].dtype}, expected {shape} {dtype}"
                     for key, (shape, dtype) in expected.items()
                     if key in tensors and (tuple(tensors[key].shape), tensors[key].dtype) != (shape, dtype)]
        if problems:
            shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
            raise CheckpointError(f"{self.path / MODEL} does not match {self.path / CONFIG} ({shown}): the config or "
                                  "the weights were changed after training; restore the pair")
        return tensors, int(metadata.get("step", "0"))

    def load_model(self, device: str = "cpu") -> tuple[LanguageModel, int]:
        """Build the model of `config.json` and load `model.safetensors` into it; returns (model, step)."""
        tensors, step = self.load_state()
        model = build_model(self.config.model, len(self.vocab), seed=self.config.train.seed)
        model.load_state_dict(tensors, strict=True)
        return model.to(device), step

    def load_optimizer_state(self, expected_step: int) -> dict[str, Any]:
        """The state of `optimizer.safetensors` in torch's state-dict format; its step must equal the model's."""
        tensors, metadata = _read_safetensors(self.path / OPTIMIZER)
        class_name = OPTIMIZER_CLASSES[self.config.train.optimizer]
        if metadata.get("format") != OPTIMIZER_FORMAT or metadata.get("class") != class_name:
            raise CheckpointError(f"{self.path / OPTIMIZER} holds no {class_name} state for this run's config")
        if int(metadata["step"]) != expected_step:
            raise CheckpointError(f"{self.path / OPTIMIZER} is from step {metadata['step']} but the model is from "
                                  f"step {expected_step}: the run was stopped while saving; it cannot be resumed "
                                  "exactly (the model is still usable for sample and eval)")
        try:
            return _optimizer_state_from(tensors, metadata)
        except (ValueError, KeyError) as error:
            raise CheckpointError(f"{self.path / OPTIMIZER} is malformed: {error}") from None

    def append_metrics(self, row: dict[str, Any]) -> None:
        """Append one row to `metrics.jsonl`."""
        with open(self.path / METRICS, "a", encoding="utf-8") as file:
            file.write(json.dumps(row) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every row of `metrics.jsonl` (empty if there is none); unreadable lines raise `CheckpointError`."""
        return read_metrics(self.path)

    def keep_metrics_until(self, step: int) -> None:
        """Drop metrics rows after `step` (and any final row), so a resumed run does not repeat them."""
        rows = [row for row in self.read_metrics() if row.get("step", 0) <= step and row.get("event") != "final"]
        atomic_write(self.path / METRICS, "".join(json.dumps(row) + "\n" for row in rows))
