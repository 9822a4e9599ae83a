"""Folding eval-mode batch norms into the Linear or convolution before them, for inference.

In eval mode a batch norm is a fixed affine map per channel, y = (z − μ)·s + β with s = γ/√(σ² + ε), μ and σ²
its running statistics. When z = W·x + b comes straight from a Linear or ConvNd, the two compose into one layer:

    W' = s·W  (row c of W, or output channel c of a kernel, times s_c)        b' = (b − μ)·s + β

with b = 0 for a layer without bias, γ = 1 and β = 0 for a norm without them. Computed in float64 and cast back
to the layer's dtype, so the folded model equals the original to rounding.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from normlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNorm
from normlab.nn.ghost import GhostBatchNorm1d
from normlab.nn.layers import Linear, Positionwise, Sequential
from normlab.nn.renorm import BatchRenorm1d
from normlab.nn.sync import SyncBatchNorm

_SEQUENTIALS = (Sequential, nn.Sequential)
_LINEARS = (Linear, nn.Linear)
# input rank each layer feeds a batch norm with: its output channels sit on axis 1 of (N, C, *spatial)
_LAYER_RANKS = ((1, _LINEARS), (1, (nn.Conv1d,)), (2, (nn.Conv2d,)), (3, (nn.Conv3d,)))
_NORM_RANKS = (
    (1, (BatchNorm1d, GhostBatchNorm1d, BatchRenorm1d, nn.BatchNorm1d)),
    (2, (BatchNorm2d, nn.BatchNorm2d)),
    (3, (BatchNorm3d, nn.BatchNorm3d)),
)
_ANY_RANK = (SyncBatchNorm, nn.SyncBatchNorm)


@dataclass(frozen=True)
class _Fold:
    """One batch norm to fold: the Sequential holding it, its name there, the layer before it, the norm."""

    sequential: nn.Module
    name: str
    qualified_name: str
    layer: nn.Module
    norm: nn.Module


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An inference copy of `model` in which each batch norm that follows a Linear or ConvNd is folded into it.

    `model` must be in eval mode (every submodule; ValueError naming the first one in training otherwise:
    a training-mode batch norm normalises with batch statistics, which no fixed weights can reproduce) and is
    left untouched. The copy is in eval mode and gives the same outputs: within 1e-10 in float64, 1e-5 in
    float32. What folds: a batch norm that comes right after a Linear (normlab's or torch's) or a
    torch.nn.Conv1d/2d/3d, as consecutive children of a Sequential (normlab's or torch's, at any depth:
    nested Sequentials, a Sequential inside any other module, e.g. `LanguageModel.layers`, a `Residual`'s
    block), where

    - the norm is normlab's or torch's BatchNorm1d/2d/3d, SyncBatchNorm, or normlab's GhostBatchNorm1d or
      BatchRenorm1d (all of them are BatchNorm in eval), of the rank that layer feeds: 1d after a Linear or
      Conv1d, 2d after a Conv2d, 3d after a Conv3d, SyncBatchNorm after any; a Linear is taken to feed it
      (N, features), the one layout in which a BatchNorm1d over its output normalises its features;
    - or the norm is wrapped in `normlab.nn.Positionwise` and follows a Linear: it normalises the
      Linear's last axis at every position, which folds just the same;
    - the norm has running statistics (track_running_stats=True): without them eval normalises with the
      batch's own statistics, which no fixed weights can reproduce, so such a norm stays;
    - num_features equals the layer's output features or channels, and neither module is used at more than one
      place in the model (folding would change the other use).

    With or without the layer's bias (one is added when it had none), affine or not. A folded norm (or its
    Positionwise wrapper) is replaced by `torch.nn.Identity` at the same place, so indices and the state-dict
    keys of every other layer stay as they were; the norm's keys disappear and the layer gains `bias`. Every
    other batch norm (one after a Tanh, a second norm in a row, a norm first in its Sequential) stays as it is.
    `foldable_batchnorms(model)` names the norms this would fold.
    """
    in_training = [name or type(model).__name__ for name, module in model.named_modules() if module.training]
    if in_training:
        raise ValueError(
            f"fold_batchnorm needs a model in eval mode, but {in_training[0]!r} is in training mode: call "
            "model.eval() first (folding bakes in the running statistics that eval mode normalises with)"
        )
    # process groups (SyncBatchNorm's) cannot be copied: the copy shares them
    groups = [module.process_group for module in model.modules() if getattr(module, "process_group", None)]
    folded = copy.deepcopy(model, memo={id(group): group for group in groups})
    for fold in _plan(folded):
        _fold_into(fold.layer, _batch_norm_of(fold.norm))
        fold.sequential.add_module(fold.name, nn.Identity().eval())
    return folded


def foldable_batchnorms(model: nn.Module) -> list[str]:
    """The qualified names (as in `model.named_modules()`) of the norms `fold_batchnorm` would fold, in order.

    Looks at the structure only: it does not require eval mode and changes nothing.
    """
    return [fold.qualified_name for fold in _plan(model)]


def _plan(model: nn.Module) -> list[_Fold]:
    """Every (layer, norm) pair of consecutive Sequential children that folds; pairs never overlap."""
    uses = Counter(id(module) for _, module in model.named_modules(remove_duplicate=False))
    folds = []
    for prefix, sequential in model.named_modules():
        if not isinstance(sequential, _SEQUENTIALS):
            continue
        children = list(sequential.named_children())
        for (_, layer), (name, norm) in zip(children, children[1:]):
            if uses[id(layer)] == 1 and uses[id(norm)] == 1 and _folds(layer, norm):
                folds.append(_Fold(sequential, name, f"{prefix}.{name}" if prefix else name, layer, norm))
    return folds


def _batch_norm_of(norm: nn.Module) -> nn.Module:
    """The batch norm itself: `norm`, or the one its Positionwise wrapper holds."""
    return norm.norm if isinstance(norm, Positionwise) else norm


def _folds(layer: nn.Module, norm: nn.Module) -> bool:
    """Whether `norm`, coming right after `layer`, can be folded into it."""
    layer_rank = next((rank for rank, classes in _LAYER_RANKS if isinstance(layer, classes)), None)
    if layer_rank is None:
        return False
    if isinstance(norm, Positionwise):
        if not isinstance(layer, _LINEARS):
            return False  # after a convolution it would normalise the last spatial axis, not the channels
        norm = norm.norm
    if not isinstance(norm, (_BatchNorm, nn.modules.batchnorm._BatchNorm)):
        return False
    norm_rank = next((rank for rank, classes in _NORM_RANKS if isinstance(norm, classes)), None)
    rank_fits = isinstance(norm, _ANY_RANK) or norm_rank == layer_rank
    has_statistics = norm.running_mean is not None and norm.running_var is not None
    return rank_fits and has_statistics and norm.num_features == layer.weight.shape[0]


def _fold_into(layer: nn.Module, norm: nn.Module) -> None:
    """Replace the layer's weight and bias by W' = s·W and b' = (b − μ)·s + β, computed in float64."""
    weight = layer.weight.detach().double()  # (out, in) or (out, in / groups, *kernel)
    bias = layer.bias.detach().double() if layer.bias is not None else weight.new_zeros(weight.shape[0])
    scale = torch.rsqrt(norm.running_var.detach().double() + norm.eps)  # (out,)
    if norm.weight is not None:
        scale = scale * norm.weight.detach().double()
    shift = norm.bias.detach().double() if norm.bias is not None else torch.zeros_like(scale)
    folded_weight = weight * scale.view(-1, *([1] * (weight.dim() - 1)))
    folded_bias = (bias - norm.running_mean.detach().double()) * scale + shift
    dtype, requires_grad = layer.weight.dtype, layer.weight.requires_grad
    layer.weight = nn.Parameter(folded_weight.to(dtype), requires_grad=requires_grad)
    bias_dtype = layer.bias.dtype if layer.bias is not None else dtype
    layer.bias = nn.Parameter(folded_bias.to(bias_dtype), requires_grad=requires_grad)
