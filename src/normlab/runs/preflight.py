"""Checks made before a run directory is created or training starts, so that a configuration that cannot train,
or cannot train meaningfully, is refused with one clear error and nothing written:

- every `--set` key takes effect, or is refused (`check_settings_take_effect`);
- batch norms get at least two examples per batch (and per ghost batch), and no split is empty
  (`check_trainable`, `check_batch`);
- the run fits in the memory of its device (`check_memory`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable

from normlab.config import BATCH_NORMS, LIMITS, RunConfig, config_keys
from normlab.data import Splits
from normlab.errors import ConfigError, DataError
from normlab.model import state_shapes

EVALUATION_CHUNK = 32_768  # examples evaluated at once (normlab.training.evaluation.evaluate)
GIGABYTE = 1024**3


def _uses_batch_statistics(config: RunConfig) -> bool:
    return config.model.norm in BATCH_NORMS or config.model.output_norm


def check_batch(config: RunConfig, batch_size: int, what: str = "train.batch_size") -> None:
    """`ConfigError` unless a batch of `batch_size` examples is meaningful for the model: between 1 and normlab's
    limit, and for batch norms at least 2 (the variance of one example is 0: its output is β whatever the
    input), also in the last ghost batch of `ghostbatch`."""
    if not 1 <= batch_size <= LIMITS["batch_size"]:
        raise ConfigError(f"{what} must be between 1 and {LIMITS['batch_size']:,}, got {batch_size}")
    if _uses_batch_statistics(config) and batch_size < 2:
        raise ConfigError(f"{what}=1 with a batch norm: one example's variance is 0, so the norm outputs its bias "
                          "whatever the input and the model learns nothing; use a batch of 2 or more, or "
                          "model.norm=layer")
    ghost = config.model.ghost_batch_size
    if config.model.norm == "ghostbatch" and (ghost == 1 or batch_size % ghost == 1):
        raise ConfigError(f"{what}={batch_size} with model.ghost_batch_size={ghost} leaves a ghost batch of one "
                          "example, whose variance is 0: choose sizes that leave at least 2 in every ghost batch")


def check_trainable(config: RunConfig, splits: Splits) -> None:
    """`ConfigError`/`DataError` for a configuration that cannot train meaningfully on `splits`: see
    `check_batch`, and every split must hold examples (the val split measures training; the test split, the
    final result)."""
    check_batch(config, config.train.batch_size)
    empty = [name for name in ("train", "val", "test") if len(splits.get(name)[0]) == 0]
    if empty:
        raise DataError(f"the {' and '.join(empty)} split(s) would be empty: {len(splits.train_words)} training "
                        "words is too few for an 80/10/10 split; give at least 10 words")


def canonical_key(item: str) -> str:
    """The `section.key` that a `--set key=value` item sets (it is already known to be valid)."""
    key = item.split("=", 1)[0].strip()
    if "." in key:
        return key
    return next(full for full in config_keys() if full.split(".", 1)[1] == key)


def check_settings_take_effect(config: RunConfig, keys: Iterable[str]) -> None:
    """`ConfigError` for a key set by the user (`section.key`) that would change nothing in `config`, so that a
    setting is never silently ignored."""
    model, train = config.model, config.train
    from normlab.training import choose_engine

    unused = {
        "data.sha256": "is recorded by normlab when the run is created (to check the words file later)",
        "train.momentum": "is SGD's; this run uses AdamW" if train.optimizer == "adamw" else None,
        "train.beta1": "is AdamW's; this run uses SGD" if train.optimizer == "sgd" else None,
        "train.lr_decay_step": None if train.schedule == "step" else f"belongs to schedule=step, not {train.schedule}",
        "train.lr_decay_factor": None if train.schedule == "step" else f"belongs to schedule=step, not "
                                                                       f"{train.schedule}",
        "train.min_lr_factor": None if train.schedule == "cosine" else "belongs to schedule=cosine",
        "train.compile": "applies to the stacked engine; this model trains on the reference engine"
        if choose_engine(model, train) == "reference" else None,
        "model.norm_groups": None if model.norm == "group" else "belongs to norm=group",
        "model.ghost_batch_size": None if model.norm == "ghostbatch" else "belongs to norm=ghostbatch",
        "model.bn_momentum": None if _uses_batch_statistics(config) else "belongs to the batch norms",
        "model.output_norm_gain": None if model.output_norm else "needs model.output_norm=true",
        "model.bias_scale": None if model.has_hidden_bias else "needs hidden biases (a norm removes them: set "
                                                               "model.hidden_bias=true)",
        "model.output_bias_scale": None if model.output_bias else "needs model.output_bias=true",
    }
    unused["train.beta2"] = unused["train.beta1"]
    for name in ("renorm_r_max", "renorm_d_max", "renorm_hold_steps", "renorm_warmup_steps"):
        unused[f"model.{name}"] = None if model.norm == "batchrenorm" else "belongs to norm=batchrenorm"
    for key in keys:
        if unused.get(key):
            raise ConfigError(f"--set {key} would have no effect: it {unused[key]}. Drop it, or change what it "
                              "depends on")


def estimated_bytes(config: RunConfig, vocab_size: int) -> int:
    """A generous estimate of the memory training `config` needs: weights, gradients and optimizer state, the
    activations of a batch and their gradients, and an evaluation chunk."""
    model = config.model
    params = sum(math.prod(shape) for shape, _ in state_shapes(model, vocab_size).values())
    slots = 2 if config.train.optimizer == "adamw" else 1
    positions = model.block_size // 2 if model.architecture == "wavenet" else 1  # of the first hidden layer
    width = model.n_embd * model.block_size + model.n_layers * model.n_hidden * positions + vocab_size
    training = params * (3 + slots) + config.train.batch_size * 6 * width
    evaluation = params + EVALUATION_CHUNK * 3 * max(model.n_hidden, model.n_embd * model.block_size, vocab_size)
    return 4 * max(training, evaluation + config.train.eval_examples * model.block_size)


def available_bytes(device: str) -> int | None:
    """Free memory on `device` (the host's available memory for the CPU), or None where it cannot be told."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo", encoding="ascii") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(config: RunConfig, vocab_size: int) -> None:
    """`ConfigError` when training `config` would need more memory than its device has free."""
    needed, free = estimated_bytes(config, vocab_size), available_bytes(config.train.device)
    if free is not None and needed > free:
        raise ConfigError(f"this configuration needs about {_gigabytes(needed)} of memory to train "
                          f"(model.n_hidden={config.model.n_hidden}, model.n_layers={config.model.n_layers}, "
                          f"train.batch_size={config.train.batch_size}) and {config.train.device} has "
                          f"{_gigabytes(free)} free: make them smaller")


def _gigabytes(count: float) -> str:
    return f"{count / GIGABYTE:.1f} GB" if count >= GIGABYTE / 10 else f"{math.ceil(count / 2**20)} MB"
