"""How the tensors of M models of one architecture are stacked, and where each sits in a model's state dict.

A stacked tensor holds model i's tensor at index i of its first axis, laid out for batched products:

    as_is        (M, *shape)            the embedding table (V, E), the output weight (V, H)
    transposed   (M, in, out)           a hidden Linear's weight (out, in), so that x @ W is `bmm(x, W)`
    row          (M, 1, H)              a vector (H,) broadcast over the batch: hidden biases, norm parameters
    column       (M, V, 1)              the output bias, broadcast over (M, V, B) logits
    scalar       (M,)                   num_batches_tracked

`state_layout(config)` lists (key, layout, is_parameter) in the order of `build_model(config).state_dict()`, so
a stacked model reads and writes run directories in the reference key format without building a module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from normlab.config import ModelConfig

STACKED_NORMS = ("none", "batch", "batchrenorm", "layer", "group", "rms")
RUNNING_NORMS = ("batch", "batchrenorm")  # norms with running statistics
# The fields M models must share to be stacked; the rest (init, scales, bn_momentum...) may differ per model.
SHAPE_FIELDS = ("architecture", "block_size", "n_embd", "n_hidden", "n_layers", "norm", "norm_groups", "activation",
                "residual", "output_norm", "output_bias", "has_hidden_bias")


class Entry(NamedTuple):
    """One tensor of a model's state dict: its key, how it is stacked, whether it is a trainable parameter."""

    key: str
    layout: str
    parameter: bool


def stacking_problem(config: ModelConfig) -> str | None:
    """Why `config` cannot run on the stacked engine, or None if it can."""
    if config.norm not in STACKED_NORMS:
        return f"norm {config.norm!r} (the stacked engine supports {', '.join(STACKED_NORMS)})"
    if config.residual:
        return "residual connections"
    if config.output_norm:
        return "a norm after the output layer"
    if config.dropout > 0:
        return f"dropout (model.dropout={config.dropout})"
    return None


def shape_key(config: ModelConfig) -> tuple:
    """Equal for configs whose models can be stacked together."""
    return tuple(getattr(config, name) for name in SHAPE_FIELDS)


def state_layout(config: ModelConfig) -> list[Entry]:
    """The entries of `build_model(config).state_dict()` for a stackable `config`, in order.

    The model is (see `normlab.model`) `Embedding, Flatten, [Linear, Norm?, Activation] × n_layers, Linear` for
    the mlp, `Embedding, [FlattenConsecutive, Linear, Norm?, Activation] × n_layers, Linear` for the wavenet,
    whose norms over channels sit in a `Positionwise` wrapper (key `.norm`).
    """
    wavenet = config.architecture == "wavenet"
    wrapped = wavenet and config.norm not in ("layer", "rms")
    entries = [Entry("layers.0.weight", "as_is", True)]
    index = 1 if wavenet else 2  # after the embedding (and the mlp's flatten)
    for _ in range(config.n_layers):
        index += 1 if wavenet else 0  # FlattenConsecutive(2)
        entries.append(Entry(f"layers.{index}.weight", "transposed", True))
        if config.has_hidden_bias:
            entries.append(Entry(f"layers.{index}.bias", "row", True))
        index += 1
        if config.norm != "none":
            prefix = f"layers.{index}.norm" if wrapped else f"layers.{index}"
            entries.append(Entry(f"{prefix}.weight", "row", True))
            if config.norm != "rms":
                entries.append(Entry(f"{prefix}.bias", "row", True))
            if config.norm in RUNNING_NORMS:
                entries += [Entry(f"{prefix}.running_mean", "row", False),
                            Entry(f"{prefix}.running_var", "row", False),
                            Entry(f"{prefix}.num_batches_tracked", "scalar", False)]
            index += 1
        index += 1  # the activation
    entries.append(Entry(f"layers.{index}.weight", "as_is", True))
    if config.output_bias:
        entries.append(Entry(f"layers.{index}.bias", "column", True))
    return entries


def stack_as(layout: str, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack one tensor of each of M models into a new contiguous tensor laid out as `layout`."""
    tensors = [t.detach() for t in tensors]
    if layout == "transposed":
        return torch.stack([t.T for t in tensors]).contiguous()
    stacked = torch.stack(tensors)
    if layout == "row":
        return stacked.unsqueeze(1).contiguous()
    if layout == "column":
        return stacked.unsqueeze(2).contiguous()
    return stacked.contiguous()


def unstack_as(layout: str, stacked: torch.Tensor, index: int) -> torch.Tensor:
    """Model `index`'s tensor, in torch's layout, as a view of a tensor stacked by `stack_as(layout, ...)`."""
    part = stacked[index]
    if layout == "transposed":
        return part.T
    return part.reshape(-1) if layout in ("row", "column") else part


def per_model_view(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """A (M, 1, 1) tensor of per-model values, for broadcasting over stacked parameters."""
    return torch.tensor(list(values), dtype=like.dtype, device=like.device).view(-1, 1, 1)
