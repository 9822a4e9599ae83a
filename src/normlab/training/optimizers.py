"""torch.optim's SGD and AdamW, as the lesson's recipe and its options configure them."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from normlab.config import TrainConfig


def make_optimizer(params: Iterable[torch.nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """SGD (the lesson's) or AdamW over `params`."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, betas=(config.beta1, config.beta2),
                             weight_decay=config.weight_decay)


def param_group_defaults(config: TrainConfig) -> dict[str, Any]:
    """The settings of the param group `make_optimizer` makes (torch 2.13's whole set: lr, momentum, foreach...),
    without its parameters: what a torch-format optimizer state dict records beside the state.

    Written out rather than read off a torch optimizer, because constructing the first one imports torch's
    compiler stack (about a second), which the stacked engine otherwise never needs; a test holds this table
    equal to torch's own groups.
    """
    if config.optimizer == "sgd":
        return {"lr": config.lr, "momentum": config.momentum, "dampening": 0, "weight_decay": config.weight_decay,
                "nesterov": False, "maximize": False, "foreach": None, "differentiable": False, "fused": None}
    return {"lr": config.lr, "betas": (config.beta1, config.beta2), "eps": 1e-8, "weight_decay": config.weight_decay,
            "amsgrad": False, "maximize": False, "foreach": None, "capturable": False, "differentiable": False,
            "fused": None, "decoupled_weight_decay": True}
