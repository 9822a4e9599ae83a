"""Engines: how the training steps of M models are computed. The loop (`normlab.training.loop`) owns everything
else a run has (schedule, batches, evaluation, checkpoints, Ctrl-C, divergence) and drives an engine through
the `Engine` interface:

    reference   normlab's modules, autograd and torch.optim, one model: the specification
    stacked     M models of one MLP architecture as stacked tensors, a hand-written backward, optionally compiled
    ddp         one model over the processes of a torch.distributed group, each taking its slice of every batch

`choose_engine` picks the engine of a configuration (`train.engine = auto | reference | stacked | ddp`) for the
CLI, the sweeps and the lab alike; `create_engine` builds it from initial or saved state dicts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from normlab.config import ModelConfig, TrainConfig
from normlab.errors import ConfigError
from normlab.model import LanguageModel, build_model
from normlab.training.engines.stacked.layout import shape_key, stacking_problem

Split = tuple[torch.Tensor, torch.Tensor]
# The train fields M models trained at once must share (the rest, e.g. lr, seed, momentum, may differ per model).
SHARED_FIELDS = ("steps", "batch_size", "optimizer", "eval_every", "checkpoint_every", "device", "engine", "compile")


class Engine(ABC):
    """The steps of M models (M = 1 except on the stacked engine), their evaluation and their state.

    Batches arrive as indices into the training split, which the engine holds on its device: the *global* batch
    of each step (an engine that splits a batch across processes takes its own slice).
    """

    num_models: int
    device: torch.device
    steps_per_call: int = 1  # the most steps `run_steps` takes at once (the compiled chunk of the stacked engine)
    processes: int = 1  # processes computing each step together (a multi-process engine: its world size)

    @abstractmethod
    def run_steps(self, indices: torch.Tensor, rates: torch.Tensor) -> torch.Tensor:
        """Train K consecutive steps (K = 1 or `steps_per_call`): batch indices (K, M, B), learning rates (K, M)
        float64 on the CPU. Returns each step's batch losses (K, M) before its update, on the device (no host
        synchronisation needed)."""

    def agree(self, losses: torch.Tensor, stop: bool) -> tuple[torch.Tensor, bool]:
        """What the processes computing the steps together must agree on at a sync of the loop: the batch losses
        (S, M) of the steps since the last sync, each process's the mean over its share of the batch, become the
        global batch's; and whether any process was asked to stop. The loop calls it at the same steps on every
        process. One process (this default): both as they are."""
        return losses, stop

    @abstractmethod
    def evaluate(self, splits: Sequence[Split]) -> list[float]:
        """Mean cross-entropy of model i on `splits[i]` in eval mode (NaN for an empty split)."""

    @abstractmethod
    def model_state(self, index: int) -> dict[str, torch.Tensor]:
        """Model `index`'s state dict in the reference key format (`build_model(...).state_dict()`); the tensors
        may be views of the engine's own: copy them to keep them."""

    @abstractmethod
    def optimizer_state(self, index: int) -> dict[str, Any]:
        """Model `index`'s optimizer state in torch.optim's state-dict format."""

    @abstractmethod
    def modules(self) -> list[LanguageModel]:
        """The M models as `LanguageModel`s holding the current weights (the live ones, or copies)."""

    # --------------------------------------------------------------------------------------------- diagnostics
    monitors: list[Any] = []

    def attach_monitors(self, every: int, **options: Any) -> list[Any]:
        """A `normlab.diagnostics.Monitor` per model, recording every `every` steps from now on (through
        `record_step`); `options` go to the Monitor."""
        raise NotImplementedError(f"{type(self).__name__} cannot record diagnostics")

    def records(self, step: int) -> bool:
        """Whether `step` (0-based) is a recording step of the attached monitors."""
        return bool(self.monitors) and step % self.monitors[0].every == 0

    def record_step(self, step: int, indices: torch.Tensor, rates: torch.Tensor) -> torch.Tensor | None:
        """Let the monitors record step `step` (indices (M, B), rates (M,)). Returns its losses (1, M) if this
        call also trained the step, or None if it only observed it (the loop then runs it with `run_steps`)."""
        raise NotImplementedError(f"{type(self).__name__} cannot record diagnostics")

    def close(self) -> None:
        """Summarise and detach the monitors (their diagnostics stay readable)."""
        for monitor in self.monitors:
            monitor.close()


def choose_engine(model: ModelConfig, train: TrainConfig) -> str:
    """The engine that runs `model` with `train`: `train.engine`, where `auto` is the ddp engine under an
    initialised torch.distributed group of more than one process, else the stacked engine whenever it supports
    the model, else the reference engine. `ConfigError` when the stacked engine is asked for a model it cannot
    run, the ddp engine without torch.distributed, or a one-process engine under several processes."""
    world = distributed_world_size()
    if train.engine == "ddp" or (train.engine == "auto" and world > 1):
        if world == 0:
            raise ConfigError("train.engine=ddp needs torch.distributed: launch the run with `normlab train --nproc "
                              "N ...` or `torchrun --nproc_per_node N -m normlab train ...`")
        return "ddp"
    if world > 1:
        raise ConfigError(f"train.engine={train.engine} would train the whole model in each of the {world} "
                          "processes of torch.distributed: use engine=auto or engine=ddp")
    problem = stacking_problem(model)
    if train.engine == "stacked" and problem is not None:
        raise ConfigError(f"train.engine=stacked cannot run {problem}: use engine=auto or engine=reference")
    if train.engine == "auto":
        return "reference" if problem is not None else "stacked"
    return train.engine


def distributed_world_size() -> int:
    """The processes of torch.distributed's default group, or 0 when none is initialised."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 0


def lockstep_key(model: ModelConfig, train: TrainConfig) -> tuple | None:
    """Configurations with equal keys can train together on one stacked engine; None: they train alone."""
    if choose_engine(model, train) != "stacked":
        return None
    return shape_key(model) + tuple(getattr(train, name) for name in SHARED_FIELDS)


def initial_states(models: Sequence[ModelConfig], trains: Sequence[TrainConfig], vocab_size: int
                   ) -> list[dict[str, torch.Tensor]]:
    """The initial state dict of each model, drawn by `build_model` with its run's seed."""
    return [build_model(model, vocab_size, seed=train.seed).state_dict() for model, train in zip(models, trains)]


def create_engine(models: Sequence[ModelConfig], trains: Sequence[TrainConfig], vocab_size: int, train_xy: Split,
                  *, states: Sequence[Mapping[str, torch.Tensor]] | None = None,
                  optimizer_states: Sequence[dict[str, Any]] | None = None, step: int = 0,
                  dtype: torch.dtype | None = None) -> Engine:
    """The engine for M configurations (one engine: several only on the stacked engine, sharing
    `lockstep_key`), starting from `states` (reference-format state dicts; None: the initial weights) and
    `optimizer_states` (None: fresh) after `step` steps. `dtype` converts the weights (e.g. float64 in tests)."""
    names = {choose_engine(model, train) for model, train in zip(models, trains)}
    if len(names) > 1 or (len(models) > 1 and len({lockstep_key(m, t) for m, t in zip(models, trains)}) > 1):
        raise ConfigError("configurations trained at once must share their architecture and the train fields "
                          f"{', '.join(SHARED_FIELDS)}, and run on the stacked engine")
    name = names.pop()
    if name != "stacked" and len(models) > 1:
        raise ConfigError(f"the {name} engine trains one model at a time; use engine=stacked for several")
    device = torch.device(trains[0].device)
    if name != "stacked":
        model = build_model(models[0], vocab_size, seed=trains[0].seed)  # drawn in float32, then converted
        if states is not None:
            model.load_state_dict(states[0])
        if dtype is not None:
            model.to(dtype)
        optimizer_state = optimizer_states[0] if optimizer_states else None
        if name == "ddp":
            from normlab.training.engines.distributed import DistributedEngine

            return DistributedEngine(model, trains[0], train_xy, optimizer_state=optimizer_state, step=step)
        from normlab.training.engines.reference import ReferenceEngine

        return ReferenceEngine(model.to(device), trains[0], train_xy, optimizer_state=optimizer_state, step=step)
    from normlab.training.engines.stacked.engine import StackedEngine

    states = initial_states(models, trains, vocab_size) if states is None else states
    states = [{key: value.to(device, dtype if value.is_floating_point() and dtype else value.dtype)
               for key, value in state.items()} for state in states]
    return StackedEngine(models, trains, vocab_size, train_xy, states, optimizer_states=optimizer_states, step=step)
