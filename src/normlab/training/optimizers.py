"""torch.optim's SGD and AdamW, as the lesson's recipe and its options configure them."""

from __future__ import annotations

import functools
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
    """The settings of the param group `make_optimizer` makes (torch's whole set: lr, momentum, foreach...),
    without its parameters: what a torch-format optimizer state dict records beside the state."""
    return dict(_defaults(config.optimizer, config.lr, config.momentum, config.weight_decay, config.beta1,
                          config.beta2))


@functools.cache
def _defaults(*settings: Any) -> tuple[tuple[str, Any], ...]:
    optimizer, lr, momentum, weight_decay, beta1, beta2 = settings
    config = TrainConfig(optimizer=optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay, beta1=beta1,
                         beta2=beta2)
    group = make_optimizer([torch.nn.Parameter(torch.zeros(1))], config).param_groups[0]
    return tuple((key, value) for key, value in group.items() if key != "params")
