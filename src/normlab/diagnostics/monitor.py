"""The Monitor: diagnostics for any ``torch.nn.Module`` through hooks, at little cost to training.

In a plain loop, three added lines (the one-call API)::

    monitor = Monitor(model, optimizer, every=100).start()   # begins step 0
    for step in range(steps):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(); loss.backward(); optimizer.step()
        monitor.step(step, loss)                              # ends this step, begins the next
    monitor.save(run_dir, report=True)                        # diagnostics/ and report.html

or the explicit protocol, which an engine drives (and the callbacks of :mod:`normlab.integrations`)::

    monitor.begin_step(step)          # arms forward hooks only when step % every == 0
    loss = ...; loss.backward()       # tensor hooks on the recorded outputs catch their gradients
    optimizer.step()                  # step pre/post hooks: values before, gradients and update after
    monitor.end_step(loss)            # keeps what the hooks captured; statistics follow in batches

A loop without a torch.optim optimizer (the lesson's ``p.data += -lr * p.grad``) brackets its update with
``monitor.before_update(lr)`` and ``monitor.after_update()`` to record update:data.

Hooks exist only during recording steps (with ``every=1`` they stay, since every step records), so every
other step runs exactly the code of an unmonitored model. A recording step captures its tensors (copies on
histogram steps, sums taken at once without copies on the others, see :mod:`normlab.diagnostics.capture`); their
statistics are computed in batches of up to :data:`BATCH_RECORDINGS` recording steps, where the code runs warm, or
whenever :attr:`Monitor.diagnostics`, :meth:`Monitor.save` or :meth:`Monitor.close` need them, or writers wait
longer than ``flush_seconds``. Histograms cost several times the scalars, so they are taken every
``histogram_every`` steps (default: on every tenth recording step, and at most every 100 steps: 1000 for
``every=100``, 100 for ``every=1``), and on forced steps; the scalars at every recording step.
"""

from __future__ import annotations

import math
import numbers
import os
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from normlab.diagnostics import collect
from normlab.diagnostics.capture import Capture, capture_gradient, capture_output, output_tensor
from normlab.diagnostics.collect import StepRecord, summarise_all
from normlab.diagnostics.distributed import AUTO, Reducer, resolve_process_group, unwrap
from normlab.diagnostics.layers import ACTIVATION, LAST_AXIS, watched
from normlab.diagnostics.parameters import ParameterReader
from normlab.diagnostics.storage import Diagnostics, ModuleInfo, save_diagnostics
from normlab.diagnostics.writers import Writer, as_writer

BATCH_RECORDINGS = 16
HISTOGRAM_STEPS = 100  # by default histograms are taken on every tenth recording step, at most every 100 steps
HISTOGRAM_RECORDINGS = 10


def _check_int(value: object, name: str, minimum: int, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum} ({hint}), got {value!r}")
    return value


def _histogram_every(every: int, histogram_every: int | None) -> int:
    if histogram_every is None:
        return every * max(HISTOGRAM_RECORDINGS, math.ceil(HISTOGRAM_STEPS / every))
    _check_int(histogram_every, "histogram_every", 1, "histograms every N steps")
    if histogram_every % every:
        raise ValueError(
            f"histogram_every ({histogram_every}) must be a multiple of every ({every}), so that histogram "
            f"steps are recording steps; e.g. histogram_every={every * math.ceil(histogram_every / every)}"
        )
    return histogram_every


class Monitor:
    """Records activation, gradient and parameter statistics of ``model`` every ``every`` steps.

    Modules (see :func:`normlab.diagnostics.layers.select_modules`): by default every module that owns
    parameters, every activation and every pooling layer; ``include`` / ``exclude`` select by type, class
    name or name glob. Every trainable parameter of the selected modules is recorded (by default: all of the
    model's), so the global gradient norm is torch's over all parameters.

    For each module it records its output (mean, std, histogram; for tanh/sigmoid-like layers the share of
    outputs with ``|t| > saturation_threshold`` and of units saturated everywhere; for ReLU/ReLU6 the share of
    dead units, for GELU/SiLU-like ones of units never positive, units along the unit axis: channels of
    ``(N, C, *)`` conv/norm/pool outputs, features of ``(N, *, F)`` ones), the gradient reaching it, and its
    parameters (values, gradients, grad:data = std(grad) / std(weights) and, with an ``optimizer``,
    update:data = std(update) / std(weights before the update), measured around ``optimizer.step()``, so it is
    right for any optimizer). A module returning a tuple is recorded through its first tensor (an RNN's output
    sequence, attention's output); one returning anything else is named in a warning at the first recording
    step. A module called several times in one step is recorded once per call, as ``name``, ``name#1``, ...
    Forward passes under ``torch.no_grad()`` (evaluation) are not recorded.

    Statistics are in float64 for float64 models, in float32 for others. ``writers`` (see
    :mod:`normlab.diagnostics.writers`; a plain callable taking a :class:`~normlab.diagnostics.collect.StepRecord`
    is a writer) receive each recording step's statistics during training. Under ``torch.distributed``,
    ``process_group`` (default ``"auto"``: the group of a ``DistributedDataParallel`` model) makes the
    statistics those of the global batch (see :mod:`normlab.diagnostics.distributed`); only the process of rank
    0 keeps them, writes and saves. Without an optimizer, parameters and their gradients are read at
    :meth:`end_step`.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        every: int = 100,
        histogram_every: int | None = None,
        include: Iterable[type | str] | None = None,
        exclude: Iterable[type | str] | None = None,
        saturation_threshold: float = 0.97,
        bins: int = 64,
        writers: Iterable[Writer | Callable[[StepRecord], Any]] = (),
        process_group: Any = AUTO,
        flush_seconds: float = 5.0,
    ) -> None:
        self.every = _check_int(every, "every", 1, "record every N steps")
        self.histogram_every = _histogram_every(every, histogram_every)
        self.bins = _check_int(bins, "bins", 2, "histogram bins")
        if not 0.5 < saturation_threshold < 1:
            raise ValueError("saturation_threshold must be in (0.5, 1) (0.97 flags tanh outputs beyond ±0.97), "
                             f"got {saturation_threshold!r}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
        group = resolve_process_group(model, process_group)
        self._reducer = Reducer(group) if group is not None else None
        self.saturation_threshold = float(saturation_threshold)
        self.flush_seconds = float(flush_seconds)
        self._diagnostics = Diagnostics(
            settings={
                "every": every, "histogram_every": self.histogram_every, "bins": bins,
                "saturation_threshold": self.saturation_threshold,
                "processes": 1 if self._reducer is None else self._reducer.world_size,
            }
        )
        self._modules, self._parameters = watched(unwrap(model), include, exclude, self._diagnostics)
        self._reader = ParameterReader(self._parameters, reuse_buffers=every == 1)
        self._optimizer = optimizer
        self._writers = [as_writer(writer) for writer in writers] if self.is_main_process else []
        self._handles: list[RemovableHandle] = []  # module and optimizer hooks, while armed
        self._capture: Capture | None = None
        self._calls: dict[str, int] = {}
        self._axes: dict[int, int] = {}  # id of a recorded output -> its unit axis, for the activations it feeds
        self._last_axis: tuple[int, int] = (0, LAST_AXIS)  # (dims, unit axis) of the last recorded output
        self._next_order = 0
        self._segment_cache: dict = {}
        self._pending: list[Capture] = []  # recording steps captured, not yet summarised
        self._pending_elements = 0
        self._first_pending = 0.0
        self._stopped: Capture | None = None  # the capture whose module outputs are complete
        self._unsupported: set[str] = set()
        self._warned = False
        self._closed = False

    @property
    def diagnostics(self) -> Diagnostics:
        """Everything recorded so far (summarising the recording steps still pending first)."""
        self._summarise_pending()
        return self._diagnostics

    @property
    def recording(self) -> bool:
        """True between ``begin_step`` and ``end_step`` of a recording step."""
        return self._capture is not None

    @property
    def is_main_process(self) -> bool:
        """True unless this is a process of rank > 0 in a distributed run (which keeps and writes nothing)."""
        return self._reducer is None or self._reducer.rank == 0

    def records(self, step: int) -> bool:
        """Whether ``step`` is a recording step (a function of the step only, the same on every process)."""
        return step % self.every == 0

    def begin_step(self, step: int, *, force: bool = False) -> bool:
        """Start training step ``step``; arm the hooks if it is a recording step. Returns whether it is.

        A step records when ``step % every == 0`` or ``force`` is true (e.g. for the final step; histograms are
        then taken too). In a distributed run every process must pass the same steps and ``force``.
        """
        off_step = type(step) is int and step > 0 and step % self.every and not force
        if off_step and self._capture is None and not self._closed:
            return False  # the common case, first and cheap
        if self._closed:
            raise RuntimeError("this Monitor is closed; create a new one to record again")
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        step = int(step)
        self._capture = None
        if not force and step % self.every:
            self._disarm()
            return False
        self._capture = Capture(step, histograms=force or step % self.histogram_every == 0)
        self._calls = {}
        self._axes = {}
        if not self._handles:
            for name, module in self._modules:
                self._handles.append(module.register_forward_hook(partial(self._on_forward, name)))
            if self._optimizer is not None:
                self._handles.append(self._optimizer.register_step_pre_hook(self._before_optimizer_step))
                self._handles.append(self._optimizer.register_step_post_hook(self._after_optimizer_step))
        return True

    def end_step(self, loss: torch.Tensor | float | None = None) -> None:
        """Finish the step: on a recording step, keep what the hooks captured (and remove them, unless every
        step records).

        ``loss`` (a scalar tensor or a float) is recorded with it. The statistics are computed with the next
        batch (see the module's notes). Nothing happens on other steps.
        """
        capture = self._capture
        if capture is None:
            return
        self._capture = None
        if self.every > 1:
            self._disarm()
        if not capture.parameters_read:
            rate = self._optimizer.param_groups[0]["lr"] if self._optimizer is not None else None
            self._read_parameters(capture, rate, before_update=False)
            self._read_gradients(capture)
        capture.snapshots.clear()  # an update begun and not ended (before_update without after_update)
        if loss is not None:
            if isinstance(loss, torch.Tensor):
                if loss.numel() != 1:
                    raise ValueError(f"loss must be a scalar, got a tensor of shape {tuple(loss.shape)}")
                capture.loss = loss.detach().reshape(())
            else:
                capture.loss = torch.tensor(float(loss))
        if not self._pending:
            self._first_pending = time.monotonic()
        self._pending.append(capture)
        self._pending_elements += capture.numel()
        if self._unsupported and not self._warned:
            self._warned = True
            warnings.warn(
                "normlab Monitor: the outputs of " + ", ".join(sorted(self._unsupported)) + " are neither tensors "
                "nor tuples starting with one, so only their parameters are recorded; exclude them, or record "
                "their submodules, to silence this", stacklevel=2,
            )
        if (
            self._reducer is not None
            or len(self._pending) >= BATCH_RECORDINGS
            or self._pending_elements >= collect.CHUNK_ELEMENTS
            or (self._writers and time.monotonic() - self._first_pending >= self.flush_seconds)
        ):
            self._summarise_pending()

    def start(self, step: int = 0) -> Monitor:
        """Begin ``step`` (default 0) and return the monitor: ``monitor = Monitor(...).start()``."""
        self.begin_step(step)
        return self

    def step(self, step: int, loss: torch.Tensor | float | None = None) -> bool:
        """End training step ``step`` with its ``loss`` and begin step ``step + 1``: the one call per step of a
        plain loop (begin step 0 with :meth:`start`). Returns whether step ``step + 1`` records."""
        self.end_step(loss)
        return self.begin_step(step + 1)

    def before_update(self, learning_rate: float | torch.Tensor | None = None) -> None:
        """For a loop that updates the parameters itself, without a torch.optim optimizer (the lesson's
        ``p.data += -lr * p.grad``): call it just before the update, and :meth:`after_update` just after.
        Parameters and gradients are read here and update:data is recorded as with an optimizer's step, with
        ``learning_rate``. Nothing happens on steps that do not record."""
        if learning_rate is not None and (isinstance(learning_rate, bool) or not isinstance(
                learning_rate, (numbers.Real, torch.Tensor))):
            raise TypeError(f"learning_rate must be a number, a tensor or None, got {learning_rate!r}")
        capture = self._capture
        if capture is not None and not capture.parameters_read:
            self._read_parameters(capture, learning_rate, before_update=True)
            self._read_gradients(capture)

    def after_update(self) -> None:
        """End the update begun by :meth:`before_update`: measure it."""
        capture = self._capture
        if capture is not None:
            self._read_update(capture)

    def stop_activations(self) -> None:
        """Record no more module outputs in this step (with gradient accumulation: keep one micro-batch's);
        parameters, gradients and the update are still recorded at the optimizer step."""
        self._stopped = self._capture

    def add_writer(self, writer: Writer | Callable[[StepRecord], Any]) -> None:
        """Send the statistics of every later recording step to ``writer`` too."""
        if self.is_main_process:
            self._writers.append(as_writer(writer))

    def _summarise_pending(self) -> None:
        pending, self._pending, self._pending_elements = self._pending, [], 0
        if not pending:
            return
        records = summarise_all(
            pending,
            bins=self.bins,
            saturation_threshold=self.saturation_threshold,
            reducer=self._reducer,
            cache=self._segment_cache,
        )
        if not self.is_main_process:
            return
        for record in records:
            self._diagnostics.add_record(record)
            for writer in self._writers:
                writer.write(record)
        for writer in self._writers:
            writer.flush()

    def save(self, run_dir: str | os.PathLike, *, report: bool = False) -> Path:
        """Write (merge) the diagnostics into ``run_dir/diagnostics/``, and with ``report`` also
        ``run_dir/report.html``; returns the diagnostics directory. Only rank 0 of a distributed run writes."""
        directory = Path(run_dir) / "diagnostics"
        diagnostics = self.diagnostics
        if not self.is_main_process:
            return directory
        directory = save_diagnostics(diagnostics, run_dir)
        if report:
            from normlab.diagnostics.report import write_report

            write_report(run_dir)
        return directory

    def close(self) -> None:
        """Remove every hook this monitor registered and close its writers. Recorded diagnostics stay."""
        self._capture = None
        self._disarm()
        if not self._closed:
            self._summarise_pending()
            for writer in self._writers:
                writer.close()
        self._closed = True

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _repr_html_(self) -> str:
        from normlab.diagnostics.notebook import diagnostics_html

        return diagnostics_html(self.diagnostics)

    def _disarm(self) -> None:
        self._reader.release()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _module_key(self, name: str) -> str:
        calls = self._calls.get(name, 0)
        self._calls[name] = calls + 1
        key = name if calls == 0 else f"{name}#{calls}"
        info = self._diagnostics.modules.get(key)
        if info is None:
            info = replace(self._diagnostics.modules[name], name=key, order=None)
        if info.order is None:
            self._diagnostics.modules[key] = replace(info, order=self._next_order)
            self._next_order += 1
        return key

    def _unit_axis(self, info: ModuleInfo, args: tuple, output: torch.Tensor) -> int:
        if info.family != ACTIVATION:
            return info.unit_axis if info.unit_axis is not None else LAST_AXIS
        source = args[0] if args and isinstance(args[0], torch.Tensor) else None
        axis = self._axes.get(id(source)) if source is not None else None
        if axis is None:
            dims, last = self._last_axis
            axis = last if dims == output.dim() else LAST_AXIS
        return axis

    def _on_forward(self, name: str, module: nn.Module, args: tuple, output: object) -> None:
        capture = self._capture
        if capture is None or capture is self._stopped or not torch.is_grad_enabled():
            return
        tensor = output_tensor(output)
        if tensor is None:
            self._unsupported.add(name)
            return
        key = self._module_key(name)
        info = self._diagnostics.modules[key]
        axis = self._unit_axis(info, args, tensor)
        self._axes[id(tensor)] = axis
        self._last_axis = (tensor.dim(), axis)
        capture.outputs.append(
            capture_output(key, tensor, info.bound, info.gate, axis, self.saturation_threshold, capture.histograms)
        )
        if tensor.requires_grad:
            tensor.register_hook(partial(self._on_output_grad, capture, key))

    def _on_output_grad(self, capture: Capture, key: str, grad: torch.Tensor) -> None:
        if self._capture is capture:
            capture.gradients.append(capture_gradient(key, grad, capture.histograms))

    def _read_parameters(self, capture: Capture, rate: float | torch.Tensor | None, *, before_update: bool) -> None:
        if not self.is_main_process:
            return  # the same on every process: rank 0 records them
        capture.learning_rate = rate.detach().clone() if isinstance(rate, torch.Tensor) else rate  # updated in place
        self._reader.read_values(capture, before_update=before_update)
        capture.awaiting_update = before_update

    def _read_gradients(self, capture: Capture) -> None:
        capture.parameters_read = True
        if self.is_main_process:
            self._reader.read_gradients(capture)

    def _read_update(self, capture: Capture) -> None:
        if capture.awaiting_update:
            capture.awaiting_update = False
            self._reader.read_update(capture)

    def _before_optimizer_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        capture = self._capture
        if capture is not None and not capture.values:
            self._read_parameters(capture, optimizer.param_groups[0]["lr"], before_update=True)

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        # gradients are read here, not before the step: a closure (Lightning, LBFGS) computes them inside it
        capture = self._capture
        if capture is None or not capture.values or capture.parameters_read:
            return
        self._read_gradients(capture)
        self._read_update(capture)
