"""Reading a model's parameters around its update: values before, gradients, and the update ``after - before``.

The :class:`~normlab.diagnostics.monitor.Monitor` reads them at the optimizer's step hooks (or, for a loop that
updates the parameters itself, around :meth:`~normlab.diagnostics.monitor.Monitor.before_update` and
:meth:`~normlab.diagnostics.monitor.Monitor.after_update`). A small model's parameters, and every model's on
histogram steps, are copied flat in one piece and summarised with numpy; a large one's are summed at once with
torch, one parameter at a time, and only the copies needed for the update are kept until it is measured.
"""

from __future__ import annotations

import torch
from torch import nn

from normlab.diagnostics import collect
from normlab.diagnostics import metrics as m
from normlab.diagnostics.capture import Capture, Piece, flatten, immediate_sums

SMALL_MODEL_ELEMENTS = 1 << 18  # parameters copied flat and summarised with numpy in one pass, not one by one


class ParameterReader:
    """The recorded parameters of a model, read into a step's :class:`Capture`.

    ``reuse_buffers`` (when every step records): the copies taken before an update are written into the buffers
    of the previous step's, so a large model's parameters are not allocated anew every step.
    """

    def __init__(self, parameters: list[tuple[str, nn.Parameter]], *, reuse_buffers: bool) -> None:
        self.parameters = parameters
        self.reuse_buffers = reuse_buffers
        self.elements = sum(parameter.numel() for _, parameter in parameters)
        # built once: the labels and lengths of the parameters' flat copies (their pieces share these lists)
        self._tensors = [parameter for _, parameter in parameters]
        self._numels = [parameter.numel() for parameter in self._tensors]
        self._labels = {kind: [(name, kind) for name, _ in parameters]
                        for kind in (m.HIST_PARAM, m.HIST_PARAM_GRAD, collect.UPDATE)}
        self._buffers: dict[int, torch.Tensor] = {}

    def release(self) -> None:
        """Free the buffers kept between steps."""
        self._buffers.clear()

    def _split(self, capture: Capture) -> tuple[list, list]:
        """The parameters whose values are copied (all, on histogram steps and for a small model), and those
        whose sums are taken at once with torch."""
        if capture.histograms or self.elements <= SMALL_MODEL_ELEMENTS:
            return self.parameters, []
        return [], self.parameters

    def read_values(self, capture: Capture, *, before_update: bool) -> None:
        """The values, into ``capture.values``; ``before_update``: keep what measuring the update will need."""
        copied, taken = self._split(capture)
        if copied:
            capture.values.append(Piece(self._labels[m.HIST_PARAM], self._numels, tensor=flatten(self._tensors)))
        for index, (name, parameter) in enumerate(taken):
            capture.values.append(Piece([(name, m.HIST_PARAM)], [parameter.numel()],
                                        sums=immediate_sums(parameter)))
            if before_update:
                capture.snapshots.append(self._snapshot(index, parameter))

    def read_gradients(self, capture: Capture) -> None:
        """The gradients (dense), into ``capture.grads``; parameters without one are left out."""
        copied, taken = self._split(capture)
        with_grad = [(name, p.grad) for name, p in copied if p.grad is not None]
        if with_grad and len(with_grad) == len(self.parameters) and not any(g.is_sparse for _, g in with_grad):
            grads = [grad for _, grad in with_grad]  # the common case: labels and lengths as built at the start
            capture.grads.append(Piece(self._labels[m.HIST_PARAM_GRAD], self._numels, tensor=flatten(grads)))
        elif with_grad:
            grads = [grad.to_dense() if grad.is_sparse else grad for _, grad in with_grad]
            capture.grads.append(
                Piece([(n, m.HIST_PARAM_GRAD) for n, _ in with_grad], [g.numel() for g in grads],
                      tensor=flatten(grads))
            )
        for name, parameter in taken:
            if parameter.grad is not None:
                grad = parameter.grad.to_dense() if parameter.grad.is_sparse else parameter.grad
                capture.grads.append(Piece([(name, m.HIST_PARAM_GRAD)], [grad.numel()],
                                           sums=immediate_sums(grad)))

    def read_update(self, capture: Capture) -> None:
        """The update since :meth:`read_values` (``before_update=True``), into ``capture.updates``."""
        copied, taken = self._split(capture)
        if copied:
            before = capture.values[0].tensor
            capture.updates.append(Piece(self._labels[collect.UPDATE], self._numels, tensor=flatten(self._tensors),
                                         minus=before))
        for (name, parameter), snapshot in zip(taken, capture.snapshots, strict=True):
            update = torch.sub(parameter.detach(), snapshot, out=snapshot)  # the snapshot is not needed again
            capture.updates.append(Piece([(name, collect.UPDATE)], [parameter.numel()],
                                         sums=immediate_sums(update)))
        capture.snapshots.clear()

    def _snapshot(self, index: int, parameter: nn.Parameter) -> torch.Tensor:
        """A copy of ``parameter`` before the update (into last step's buffer with ``reuse_buffers``)."""
        values = parameter.detach()
        if not self.reuse_buffers:
            return values.clone()
        buffer = self._buffers.get(index)
        if buffer is None or buffer.shape != values.shape or buffer.dtype != values.dtype or (
            buffer.device != values.device
        ):
            buffer = self._buffers[index] = torch.empty_like(values, memory_format=torch.contiguous_format)
        return buffer.copy_(values)
