"""The experiments of the lab, by name, in the order of the lesson's claims."""

from __future__ import annotations

from normlab.errors import ConfigError
from normlab.lab import (
    affine,
    batch_coupling,
    data_parallel,
    depth,
    init_schemes,
    init_sensitivity,
    landscape,
    learning_rate,
    momentum,
    recipe_differences,
    saturation,
    seeds,
    small_batch,
    softmax_init,
    temperature,
    train_vs_eval,
)
from normlab.lab.common import Experiment

EXPERIMENTS: dict[str, Experiment] = {module.EXPERIMENT.name: module.EXPERIMENT for module in (
    depth, saturation, init_sensitivity, learning_rate, train_vs_eval, momentum, affine, temperature, init_schemes,
    softmax_init, seeds, batch_coupling, data_parallel, landscape, recipe_differences, small_batch)}


def get_experiment(name: str) -> Experiment:
    """The experiment called `name`; `ConfigError` listing the valid names otherwise."""
    if name not in EXPERIMENTS:
        raise ConfigError(f"unknown experiment {name!r}: choose one of {', '.join(EXPERIMENTS)} or all "
                          "(see `normlab lab list`)")
    return EXPERIMENTS[name]
