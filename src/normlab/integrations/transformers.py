"""Hugging Face ``transformers``: ``Trainer(..., callbacks=[NormlabCallback("runs/diag")])``
(``normlab[transformers]``).

The callback attaches a :class:`~normlab.diagnostics.Monitor` to the model when training begins, records every
``every`` optimizer steps (``state.global_step``) and writes ``run_dir/diagnostics/`` and ``run_dir/report.html``
when training ends (default ``run_dir``: ``<output_dir>/normlab``). The loss is the step's mean loss, from the
``loss`` of the model's outputs: averaged over the micro-batches of gradient accumulation, or summed when the
Trainer passed ``num_items_in_batch`` (each is then a share of the step's loss). The gradients are those the
optimizer uses (after the Trainer's clipping, ``max_grad_norm``). With gradient accumulation the module outputs
of the first micro-batch of a step are recorded, the accumulated gradients and the update of the optimizer step.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from normlab.diagnostics import Monitor
from normlab.integrations._common import MonitorOptions

try:
    from transformers import TrainerCallback
except ImportError as error:
    raise ImportError(
        "normlab.integrations.transformers needs transformers: pip install 'normlab[transformers]'"
    ) from error


def _output_loss(output: Any) -> torch.Tensor | None:
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    return loss if isinstance(loss, torch.Tensor) and loss.numel() == 1 else None


class NormlabCallback(TrainerCallback):
    """Records normlab diagnostics of a ``transformers.Trainer`` run and writes its report into ``run_dir``.

    ``every``: record every N optimizer steps; ``report``: write ``report.html`` at the end; ``tensorboard``: a
    directory to stream the statistics to while training runs; ``writers``: more live writers; any other keyword
    goes to :class:`~normlab.diagnostics.Monitor` (``include``, ``exclude``, ``histogram_every``, ``bins``...).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike | None = None,
        *,
        every: int = 100,
        report: bool = True,
        tensorboard: str | os.PathLike | None = None,
        writers: tuple = (),
        **monitor_options: Any,
    ) -> None:
        self._settings = (run_dir, every, report, tensorboard, tuple(writers), monitor_options)
        self.options: MonitorOptions | None = None
        self.monitor: Monitor | None = None
        self._losses: list[torch.Tensor] = []
        self._shares = False  # whether the model's losses are shares of the step's (num_items_in_batch)
        self._hook: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       **kwargs: Any) -> None:
        """Attach the monitor to the model and the optimizer, and a hook that keeps the model's loss."""
        run_dir, every, report, tensorboard, writers, monitor_options = self._settings
        run_dir = Path(args.output_dir) / "normlab" if run_dir is None else run_dir
        self.options = MonitorOptions(run_dir, every, report, tensorboard, writers, monitor_options)
        self.monitor = self.options.monitor(model, optimizer, args.world_size, state.is_world_process_zero)
        self._hook = model.register_forward_hook(self._keep_loss, with_kwargs=True)

    def _keep_loss(self, module: Any, args: Any, kwargs: dict, output: Any) -> None:
        if self.monitor is not None and self.monitor.recording and torch.is_grad_enabled():
            loss = _output_loss(output)
            if loss is not None:
                self._losses.append(loss.detach())
                self._shares = kwargs.get("num_items_in_batch") is not None

    def _step_loss(self) -> torch.Tensor | None:
        if not self._losses:
            return None
        total = torch.stack(self._losses).sum()
        return total if self._shares else total / len(self._losses)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Begin the optimizer step ``state.global_step``."""
        if self.monitor is not None:
            self._losses = []
            self.monitor.begin_step(state.global_step)

    def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """After an accumulation micro-batch: stop recording module outputs for this step."""
        if self.monitor is not None and self.monitor.recording:
            self.monitor.stop_activations()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """End the step, with its mean loss."""
        if self.monitor is not None:
            self.monitor.end_step(self._step_loss())

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Write the diagnostics and the report (main process), and remove every hook."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.options is not None:
            self.options.finish(self.monitor, state.is_world_process_zero)
