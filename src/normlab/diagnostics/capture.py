"""What a recording step captures: copies of tensors, or their sums taken at once where they lie.

On a histogram step every recorded tensor is copied (in its working dtype: float64 stays float64, every other
float becomes float32); on the other steps module outputs and their gradients are reduced at once, without a
copy (:func:`immediate_sums`; for an output, its unit statistics too). :mod:`normlab.diagnostics.collect` turns a
:class:`Capture` into statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch._utils import _flatten_dense_tensors
from torch.nn.utils.rnn import PackedSequence

from normlab.diagnostics import metrics as m
from normlab.diagnostics.stats import array_sums, saturation_mask, tensor_sums, units_all, units_any

HOST_DTYPES = (torch.float32, torch.float64)


def output_tensor(output: object) -> torch.Tensor | None:
    """The tensor that stands for a module's output: itself, a PackedSequence's data, or the first element of a
    tuple or list (an RNN's output sequence, attention's output); None when there is none."""
    if isinstance(output, (tuple, list)) and output and not isinstance(output, PackedSequence):
        output = output[0]
    if isinstance(output, PackedSequence):
        output = output.data
    if isinstance(output, torch.Tensor) and output.is_floating_point():
        return output
    return None


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are taken in: float64 for float64 tensors, float32 for every other one."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def copy_of(tensor: torch.Tensor) -> torch.Tensor:
    """A detached copy in the working dtype (a later in-place operation cannot change it)."""
    tensor = tensor.detach()
    dtype = working_dtype(tensor.dtype)
    return tensor.clone() if tensor.dtype == dtype else tensor.to(dtype)


def flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One vector of all ``tensors`` in the working dtype, on the first one's device (always a new tensor)."""
    device, dtype = tensors[0].device, tensors[0].dtype
    with torch.no_grad():
        if all(t.device == device and t.dtype == dtype for t in tensors):
            flat = _flatten_dense_tensors(tensors)  # the concatenation in one C++ call
        else:
            flat = torch.cat([t.reshape(-1) if t.device == device else t.reshape(-1).to(device) for t in tensors])
    dtype = working_dtype(flat.dtype)
    return flat if flat.dtype == dtype else flat.to(dtype)


def immediate_sums(tensor: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """Sum and sum of squared deviations of ``tensor`` in its working dtype, taken now, without a copy.

    In CPU memory with numpy (a view; floats), whose small reductions cost a fraction of torch's; elsewhere
    with :func:`~normlab.diagnostics.stats.tensor_sums` on the device (0-d tensors, read later in one copy).
    """
    tensor = tensor.detach()
    if tensor.device.type == "cpu" and tensor.dtype in HOST_DTYPES:
        return array_sums(tensor.numpy())
    dtype = working_dtype(tensor.dtype)
    return tensor_sums(tensor if tensor.dtype == dtype else tensor.to(dtype))


@dataclass
class Piece:
    """A flat run of segments, each labelled ``(layer, kind)`` with ``numels`` elements.

    Its values are ``tensor`` (minus ``minus``, for an update), or, for one segment, ``sums`` already taken
    (sum and sum of squared deviations from the mean, see :func:`~normlab.diagnostics.stats.tensor_sums`).
    """

    labels: list[tuple[str, str]]
    numels: list[int]
    tensor: torch.Tensor | None = None
    minus: torch.Tensor | None = None
    sums: tuple[torch.Tensor | float, torch.Tensor | float] | None = None


@dataclass
class Output:
    """A recorded module output: its piece, what kind of activation it is, and its unit statistics.

    ``unit_axis`` is None when the output has fewer than two dimensions (no units). For an output whose sums
    were taken at once, ``saturated`` (count of saturated elements), ``fired`` (per unit: any positive value)
    and ``unsaturated`` (per unit: any value outside the tails) were taken with it; otherwise they are computed
    from the copy when the step is summarised.
    """

    piece: Piece
    bound: str | None
    gate: str | None
    unit_axis: int | None
    saturated: torch.Tensor | np.ndarray | None = None
    fired: torch.Tensor | np.ndarray | None = None
    unsaturated: torch.Tensor | np.ndarray | None = None


def capture_output(
    key: str, tensor: torch.Tensor, bound: str | None, gate: str | None, unit_axis: int | None,
    threshold: float, keep_copy: bool,
) -> Output:
    """Capture one module output: a copy, or (``keep_copy`` false) its sums and unit statistics at once."""
    numel = tensor.numel()
    axis = unit_axis if tensor.dim() >= 2 else None
    if keep_copy:
        return Output(Piece([(key, m.HIST_ACT)], [numel], tensor=copy_of(tensor)), bound, gate, axis)
    values = tensor.detach()
    output = Output(Piece([(key, m.HIST_ACT)], [numel], sums=immediate_sums(values)), bound, gate, axis)
    if bound is None and (gate is None or axis is None):
        return output
    if values.device.type == "cpu" and values.dtype in HOST_DTYPES:
        values = values.numpy()  # a view: numpy's small reductions cost a fraction of torch's
    if bound is not None:
        mask = saturation_mask(values, threshold, bound)
        output.saturated = np.count_nonzero(mask) if isinstance(mask, np.ndarray) else mask.sum()
        if axis is not None:
            output.unsaturated = ~units_all(mask, axis)  # any(~mask), without the negated copy of the mask
    if gate is not None and axis is not None:
        output.fired = units_any(values > 0, axis)
    return output


def capture_gradient(key: str, grad: torch.Tensor, keep_copy: bool) -> Piece:
    """Capture the gradient reaching a module output: a copy, or its sums at once."""
    if keep_copy:
        return Piece([(key, m.HIST_GRAD)], [grad.numel()], tensor=copy_of(grad))
    return Piece([(key, m.HIST_GRAD)], [grad.numel()], sums=immediate_sums(grad))


@dataclass
class Capture:
    """What one recording step captured, in the order its statistics are computed.

    ``values``, ``grads`` and ``updates`` hold the parameters' pieces (the values read before the optimizer
    step, the gradients and the updates ``after - before``); ``snapshots`` the copies of large parameters
    taken before the update, until the update is measured.
    """

    step: int
    histograms: bool
    outputs: list[Output] = field(default_factory=list)
    gradients: list[Piece] = field(default_factory=list)
    values: list[Piece] = field(default_factory=list)
    grads: list[Piece] = field(default_factory=list)
    updates: list[Piece] = field(default_factory=list)
    snapshots: list[torch.Tensor] = field(default_factory=list)
    parameters_read: bool = False
    awaiting_update: bool = False  # values were read before an update that is not measured yet
    loss: torch.Tensor | None = None
    learning_rate: float | torch.Tensor | None = None

    def pieces(self) -> list[Piece]:
        """Every piece: outputs, their gradients (the batch statistics), then values, gradients, updates."""
        return [o.piece for o in self.outputs] + self.gradients + self.values + self.grads + self.updates

    def numel(self) -> int:
        """Elements held in copies (what the step keeps in memory until it is summarised)."""
        return sum(p.tensor.numel() for p in self.pieces() if p.tensor is not None)
