"""The Monitor: diagnostics for any ``torch.nn.Module`` through hooks, at almost no cost to training.

Protocol in a training loop::

    with Monitor(model, optimizer, every=100) as monitor:
        for step in range(steps):
            monitor.begin_step(step)          # arms forward hooks only when step % every == 0
            loss = F.cross_entropy(model(x), y)
            loss.backward()                   # tensor hooks on the recorded outputs catch their gradients
            optimizer.step()                  # step pre/post hooks snapshot the parameters around the update
            monitor.end_step(loss)            # keeps what the hooks captured; statistics follow in batches
        monitor.save(run_dir)

Every hook (forward, tensor and optimizer hooks) exists only between ``begin_step`` and ``end_step`` of a
recording step, so every other step runs exactly the code of an unmonitored model.

A recording step only captures tensors (copies, on their device); their statistics are computed in batches of
up to :data:`BATCH_RECORDINGS` recording steps (fewer when the captured values exceed
``collect.CHUNK_ELEMENTS``), or whenever :attr:`Monitor.diagnostics`, :meth:`Monitor.save` or
:meth:`Monitor.close` needs them. Within a batch the statistics code runs warm in the CPU's caches, which on
a small model is most of its cost; on a GPU a recording step then never waits for the device.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Iterable
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from normlab.diagnostics import collect
from normlab.diagnostics.collect import Capture, summarise
from normlab.diagnostics.layers import select_modules
from normlab.diagnostics.storage import Diagnostics, ModuleInfo, ParameterInfo, save_diagnostics

ROOT = "(root)"
BATCH_RECORDINGS = 16


def _flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One float32 vector of all ``tensors``, on the first one's device.

    torch.cat always allocates, so this is also a snapshot that a later in-place update cannot touch.
    """
    device = tensors[0].device
    with torch.no_grad():
        flat = torch.cat([t.reshape(-1) if t.device == device else t.reshape(-1).to(device) for t in tensors])
    return flat if flat.dtype == torch.float32 else flat.float()


def _numel(capture: Capture) -> int:
    tensors = [t for _, t in capture.activations + capture.activation_grads]
    tensors += [t for t in (capture.parameter_values, capture.parameter_grads, capture.updates) if t is not None]
    return sum(t.numel() for t in tensors)


class Monitor:
    """Records activation, gradient and parameter statistics of ``model`` every ``every`` steps.

    ``include`` / ``exclude`` select modules by type, class name or name glob (default: every activation,
    Linear, Embedding and norm layer; see :func:`normlab.diagnostics.layers.select_modules`). For each
    selected module it records its output (mean, std, histogram, saturated share for tanh/sigmoid-like
    layers with ``|t| > saturation_threshold``, dead share for ReLU-like ones), the gradient of that output,
    and its own trainable parameters (values, gradients, grad:data = std(grad) / std(weights) and, with an
    ``optimizer``, update:data = std(update) / std(weights before the update), the update being measured
    around ``optimizer.step()``, so it is right for any optimizer). Histograms have ``bins`` equal-width bins.

    A module called several times in one step is recorded once per call, as ``name``, ``name#1``, ...
    Outputs that are not a single tensor are skipped. Without an optimizer, parameters and their gradients are
    read at :meth:`end_step`. Use as a context manager, or call :meth:`close` to remove every hook. Read the
    records from :attr:`diagnostics` (which first summarises any recording steps still pending).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        every: int = 100,
        include: Iterable[type | str] | None = None,
        exclude: Iterable[type | str] | None = None,
        saturation_threshold: float = 0.97,
        bins: int = 64,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int (record every N steps), got {every!r}")
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
            raise ValueError(f"bins must be an int >= 2, got {bins!r}")
        if not 0.5 < saturation_threshold < 1:
            raise ValueError(
                f"saturation_threshold must be in (0.5, 1) (0.97 flags tanh outputs beyond ±0.97), "
                f"got {saturation_threshold!r}"
            )
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}"
            )
        self.every = every
        self.bins = bins
        self.saturation_threshold = float(saturation_threshold)
        self._diagnostics = Diagnostics(
            settings={"every": every, "bins": bins, "saturation_threshold": self.saturation_threshold}
        )
        self._modules: list[tuple[str, nn.Module]] = []
        self._parameters: list[tuple[str, nn.Parameter]] = []
        seen: set[int] = set()
        for name, module, kind in select_modules(model, include, exclude):
            name = name or ROOT
            self._modules.append((name, module))
            self._diagnostics.modules[name] = ModuleInfo(
                name, type(module).__name__, kind.family, kind.bound, kind.relu_like
            )
            for short, parameter in module.named_parameters(recurse=False):
                if parameter.requires_grad and id(parameter) not in seen:
                    seen.add(id(parameter))
                    full = short if name == ROOT else f"{name}.{short}"
                    self._diagnostics.parameters[full] = ParameterInfo(
                        full, name, type(module).__name__, tuple(parameter.shape), len(self._parameters)
                    )
                    self._parameters.append((full, parameter))
        self._optimizer = optimizer
        self._handles: list[RemovableHandle] = []  # every hook of the current recording step
        self._capture: Capture | None = None
        self._step = 0
        self._calls: dict[str, int] = {}
        self._next_order = 0
        self._segment_cache: dict = {}
        self._pending: list[tuple[int, Capture]] = []  # recording steps captured, not yet summarised
        self._pending_elements = 0
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

    def begin_step(self, step: int, *, force: bool = False) -> bool:
        """Start training step ``step``; arm the hooks if it is a recording step. Returns whether it is.

        A step records when ``step % every == 0`` or ``force`` is true (e.g. for the final step).
        """
        off_step = type(step) is int and step > 0 and step % self.every and not force
        if off_step and self._capture is None and not self._closed:
            return False  # the common case, first and cheap
        if self._closed:
            raise RuntimeError("this Monitor is closed; create a new one to record again")
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        step = int(step)
        if self._capture is not None:
            self._disarm()
        if not force and step % self.every:
            return False
        self._step = step
        self._capture = Capture()
        self._calls = {}
        for name, module in self._modules:
            self._handles.append(module.register_forward_hook(partial(self._on_forward, name)))
        if self._optimizer is not None:
            self._handles.append(self._optimizer.register_step_pre_hook(self._before_optimizer_step))
            self._handles.append(self._optimizer.register_step_post_hook(self._after_optimizer_step))
        return True

    def end_step(self, loss: torch.Tensor | float | None = None) -> None:
        """Finish the step: on a recording step, remove the hooks and keep what they captured.

        ``loss`` (a scalar tensor or a float) is recorded with it. The statistics are computed with the next
        batch (see the module's notes). Nothing happens on other steps.
        """
        capture = self._capture
        if capture is None:
            return
        self._disarm()
        if capture.parameter_values is None:
            self._capture_parameters(capture)
        if loss is not None:
            if isinstance(loss, torch.Tensor):
                if loss.numel() != 1:
                    raise ValueError(f"loss must be a scalar, got a tensor of shape {tuple(loss.shape)}")
                capture.loss = loss.detach().clone()
            else:
                capture.loss = torch.tensor(float(loss))
        self._pending.append((self._step, capture))
        self._pending_elements += _numel(capture)
        if len(self._pending) >= BATCH_RECORDINGS or self._pending_elements >= collect.CHUNK_ELEMENTS:
            self._summarise_pending()

    def _summarise_pending(self) -> None:
        pending, self._pending, self._pending_elements = self._pending, [], 0
        names = [name for name, _ in self._parameters]
        numels = [parameter.numel() for _, parameter in self._parameters]
        for step, capture in pending:
            summarise(
                capture,
                step,
                self._diagnostics,
                parameter_names=names,
                parameter_numels=numels,
                bins=self.bins,
                saturation_threshold=self.saturation_threshold,
                cache=self._segment_cache,
            )

    def save(self, run_dir: str | os.PathLike) -> Path:
        """Write (merge) the diagnostics into ``run_dir/diagnostics/``; returns that directory."""
        return save_diagnostics(self.diagnostics, run_dir)

    def close(self) -> None:
        """Remove every hook this monitor registered. Recorded diagnostics stay available."""
        self._disarm()
        self._summarise_pending()
        self._closed = True

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _disarm(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._capture = None

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

    def _on_forward(self, name: str, module: nn.Module, args: tuple, output: object) -> None:
        if self._capture is None or not isinstance(output, torch.Tensor):
            return
        key = self._module_key(name)
        # a copy, because a later in-place op (ReLU(inplace=True), x += ...) may overwrite the output
        self._capture.activations.append((key, output.detach().clone()))
        if output.requires_grad:
            self._handles.append(output.register_hook(partial(self._on_output_grad, key)))

    def _on_output_grad(self, key: str, grad: torch.Tensor) -> None:
        if self._capture is not None:
            self._capture.activation_grads.append((key, grad.detach().clone()))

    def _capture_parameters(self, capture: Capture) -> None:
        if self._optimizer is not None:
            rate = self._optimizer.param_groups[0]["lr"]  # a tensor rate is updated in place: copy it
            capture.learning_rate = rate.detach().clone() if isinstance(rate, torch.Tensor) else rate
        if not self._parameters:
            return
        capture.parameter_values = _flatten([parameter for _, parameter in self._parameters])
        with_grad = [(name, p.grad) for name, p in self._parameters if p.grad is not None]
        if with_grad:
            grads = [grad.to_dense() if grad.is_sparse else grad for _, grad in with_grad]
            capture.parameter_grads = _flatten(grads)
            capture.grad_names = [name for name, _ in with_grad]
            capture.grad_numels = [grad.numel() for grad in grads]

    def _before_optimizer_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        capture = self._capture
        if capture is not None and capture.parameter_values is None:
            self._capture_parameters(capture)

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        capture = self._capture
        if capture is not None and capture.parameter_values is not None:
            after = _flatten([parameter for _, parameter in self._parameters])
            capture.updates = after - capture.parameter_values
