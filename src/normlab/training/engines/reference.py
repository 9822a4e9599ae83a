"""The reference engine: one model of normlab's layers, autograd and torch.optim. The specification that every
other engine is tested against, and the engine of every model the stacked engine does not run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from normlab.config import TrainConfig
from normlab.model import LanguageModel, dropout_layers, seed_dropout
from normlab.training.engines import Engine, Split
from normlab.training.evaluation import evaluate
from normlab.training.optimizers import make_optimizer


def gradients(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, grad_clip: float | None) -> torch.Tensor:
    """The gradients of a training step, into the parameters' `.grad`: cross-entropy of `model(x)` against `y`,
    backward, optional clipping of the global gradient norm to `grad_clip`. Returns the batch loss."""
    loss = F.cross_entropy(model(x), y)
    for parameter in model.parameters():
        parameter.grad = None
    loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    return loss.detach()


def reference_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                   rate: float, grad_clip: float | None) -> torch.Tensor:
    """One training step of the lesson: `gradients`, then `optimizer.step()` with learning rate `rate`. Returns
    the batch loss before the update."""
    for group in optimizer.param_groups:
        group["lr"] = rate
    loss = gradients(model, x, y, grad_clip)
    optimizer.step()
    return loss


class ReferenceEngine(Engine):
    """Trains `model` with minibatch cross-entropy: forward, `loss.backward()`, optional clipping of the global
    gradient norm, `optimizer.step()`. `step` is the number of steps already trained (the run's checkpoint):
    the model's Dropout layers are reseeded before every step from (seed, step) (`normlab.model.seed_dropout`)."""

    num_models = 1
    rank = 0

    def __init__(self, model: LanguageModel, config: TrainConfig, train_xy: Split, *,
                 optimizer_state: dict[str, Any] | None = None, step: int = 0) -> None:
        self.device = torch.device(config.device)
        self.seed, self.next_step, self.dropouts = config.seed, step, dropout_layers(model)
        self.model = model.to(self.device).train()
        self.optimizer = make_optimizer(model.parameters(), config)
        if optimizer_state is not None:
            self.optimizer.load_state_dict(optimizer_state)
        self.grad_clip = config.grad_clip
        self.x, self.y = train_xy[0].to(self.device), train_xy[1].to(self.device)
        self.monitors: list[Any] = []

    def _draw_masks(self) -> None:
        """Seed the Dropout layers for the step about to run, and count it."""
        if self.dropouts:
            seed_dropout(self.dropouts, self.seed, self.next_step, rank=self.rank, device=self.device)
        self.next_step += 1

    def _step(self, index: torch.Tensor, rate: float) -> torch.Tensor:
        self._draw_masks()
        return reference_step(self.model, self.optimizer, self.x[index], self.y[index], rate, self.grad_clip)

    def run_steps(self, indices: torch.Tensor, rates: torch.Tensor) -> torch.Tensor:
        """One step per row of `indices` (K, 1, B)."""
        return torch.stack([self._step(indices[k, 0], float(rates[k, 0])) for k in range(len(indices))]).view(-1, 1)

    def evaluate(self, splits: Sequence[Split]) -> list[float]:
        return [evaluate(self.model, *splits[0])]

    def model_state(self, index: int) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def optimizer_state(self, index: int) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def modules(self) -> list[LanguageModel]:
        return [self.model]

    def attach_monitors(self, every: int, **options: Any) -> list[Any]:
        """A Monitor on the model itself, measuring update:data around the real optimizer step."""
        from normlab.diagnostics import Monitor

        self.monitors = [Monitor(self.model, self.optimizer, every=every, **options)]
        return self.monitors

    def record_step(self, step: int, indices: torch.Tensor, rates: torch.Tensor) -> torch.Tensor | None:
        """Train step `step` with the monitor's hooks armed."""
        monitor = self.monitors[0]
        self.next_step = step
        monitor.begin_step(step)
        loss = self._step(indices[0], float(rates[0]))
        monitor.end_step(loss)
        return loss.view(1, 1)
