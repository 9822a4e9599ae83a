"""Tensors on disk for run directories: safetensors read with every kind of damage turned into one clear error,
and the optimizer's state dict as safetensors (tensors) plus JSON metadata (the rest). Nothing is unpickled."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from normlab.errors import CheckpointError

MODEL_FORMAT, OPTIMIZER_FORMAT = "normlab-model-1", "normlab-optimizer-1"


def read_safetensors(path: Path, missing: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; `CheckpointError` if it is missing (the message ends with
    `missing`) or damaged."""
    if path.is_symlink():
        raise CheckpointError(f"{path} is a symbolic link: a checkpoint holds its files itself; restore the file")
    if not path.is_file():
        raise CheckpointError(f"{path} is missing{missing}")
    try:
        data = path.read_bytes()
        tensors = load_safetensors(data)
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
    except Exception as error:  # safetensors raises its own error types for every kind of corruption
        raise CheckpointError(f"{path} is corrupted and cannot be read ({type(error).__name__}: "
                              f"{str(error)[:120]}); restore it from a backup or train again") from None
    return tensors, metadata


def step_of(metadata: dict[str, str], path: Path) -> int:
    """The training step stamped on a checkpoint file; `CheckpointError` if it is not a whole number >= 0."""
    text = metadata.get("step", "0")
    if not (isinstance(text, str) and text.isascii() and text.isdigit()):
        raise CheckpointError(f"{path} is damaged: its step {text!r} is not a whole number")
    return int(text)


def model_bytes(state: dict[str, torch.Tensor], step: int, **metadata: str) -> bytes:
    """A model state dict as safetensors bytes, stamped with its format and step."""
    tensors = {key: value.detach().contiguous().cpu() for key, value in state.items()}
    return save_safetensors(tensors, metadata={"format": MODEL_FORMAT, "step": str(step), **metadata})


def optimizer_bytes(state: dict[str, Any], class_name: str, step: int) -> bytes:
    """torch.optim's state dict as safetensors: the tensors by `state.<index>.<key>`, the rest as JSON."""
    tensors, other = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value.detach().contiguous().cpu().clone()
            else:
                other[f"{index}.{key}"] = value
    metadata = {"format": OPTIMIZER_FORMAT, "step": str(step), "class": class_name,
                "param_groups": json.dumps(state["param_groups"]), "state": json.dumps(other)}
    return save_safetensors(tensors, metadata=metadata)


def optimizer_state(tensors: dict[str, torch.Tensor], metadata: dict[str, str], parameter_shapes: list[tuple],
                    path: Path) -> dict[str, Any]:
    """Inverse of `optimizer_bytes`, checked against the model's parameter shapes (in `parameters()` order);
    `CheckpointError` naming what does not fit."""
    try:
        state: dict[int, dict[str, Any]] = {}
        for name, tensor in tensors.items():
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = tensor
        for name, value in json.loads(metadata["state"]).items():
            index, key = name.split(".", 1)
            state.setdefault(int(index), {})[key] = value
        groups = json.loads(metadata["param_groups"])
        indices = sorted(i for group in groups for i in group["params"])
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(f"{path} is malformed ({type(error).__name__}: {error})") from None
    if indices != list(range(len(parameter_shapes))) or not set(state) <= set(indices):
        raise CheckpointError(f"{path} holds the state of {len(indices)} parameters, the model has "
                              f"{len(parameter_shapes)}: the optimizer state does not belong to this run")
    for index, values in state.items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and tuple(value.shape) != parameter_shapes[index]:
                raise CheckpointError(f"{path}: state.{index}.{key} is {tuple(value.shape)}, the parameter is "
                                      f"{parameter_shapes[index]}: the optimizer state does not belong to this run")
    return {"state": state, "param_groups": groups}
