"""PyTorch Lightning: ``trainer = Trainer(callbacks=[NormlabCallback("runs/diag")])`` (``normlab[lightning]``).

The callback attaches a :class:`~normlab.diagnostics.Monitor` to the LightningModule when training starts,
records every ``every`` optimizer steps (Lightning's ``global_step``) and writes ``run_dir/diagnostics/`` and
``run_dir/report.html`` when training ends. The update is measured around the optimizer's step, where Lightning
also runs ``training_step`` and ``backward`` (inside the step's closure); the gradients are read after them.
With gradient accumulation the module outputs of the first micro-batch of a step are recorded, the
accumulated gradients and the update of the optimizer step. The first optimizer of ``configure_optimizers``
is watched. Works with ``lightning`` (``lightning.pytorch``) or the older ``pytorch_lightning`` package.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from normlab.diagnostics import Monitor
from normlab.integrations._common import MonitorOptions

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover - the older package name
    try:
        from pytorch_lightning.callbacks import Callback
    except ImportError as error:
        raise ImportError(
            "normlab.integrations.lightning needs PyTorch Lightning: pip install 'normlab[lightning]'"
        ) from error


def _loss(outputs: Any) -> Any:
    if isinstance(outputs, Mapping):
        return outputs.get("loss")
    return outputs


class NormlabCallback(Callback):
    """Records normlab diagnostics of a Lightning run and writes its report into ``run_dir``.

    ``every``: record every N optimizer steps; ``report``: write ``report.html`` at the end; ``tensorboard``: a
    directory to stream the statistics to while training runs; ``writers``: more live writers; any other keyword
    goes to :class:`~normlab.diagnostics.Monitor` (``include``, ``exclude``, ``histogram_every``, ``bins``...).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        every: int = 100,
        report: bool = True,
        tensorboard: str | os.PathLike | None = None,
        writers: tuple = (),
        **monitor_options: Any,
    ) -> None:
        super().__init__()
        self.options = MonitorOptions(run_dir, every, report, tensorboard, tuple(writers), monitor_options)
        self.monitor: Monitor | None = None
        self._step = 0

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Attach the monitor to the module and the first optimizer."""
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        self.monitor = self.options.monitor(pl_module, optimizer, trainer.world_size, trainer.is_global_zero)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        """Begin the optimizer step (once, at its first micro-batch)."""
        if self.monitor is not None and not self.monitor.recording:
            self._step = trainer.global_step
            self.monitor.begin_step(self._step)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """End the step once the optimizer has stepped; after an accumulation micro-batch, stop recording
        module outputs."""
        if self.monitor is None or not self.monitor.recording:
            return
        if trainer.global_step > self._step:
            self.monitor.end_step(_loss(outputs))
        else:
            self.monitor.stop_activations()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Write the diagnostics and the report (rank 0), and remove every hook."""
        self.options.finish(self.monitor, trainer.is_global_zero)
