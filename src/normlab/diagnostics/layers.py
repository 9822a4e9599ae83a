"""Which modules of a model to watch, decided by class name and by parameter ownership.

The diagnostics never import a layer library: a module is classified by the names of the classes in its MRO,
so ``torch.nn.Tanh``, normlab's own ``Tanh`` and a user's class called ``Tanh`` are all treated alike, and a
subclass inherits its parent's kind (``NonDynamicallyQuantizableLinear`` is a ``Linear``).

By default every module that owns parameters (Linear, Conv*, RNN/LSTM/GRU, Embedding, MultiheadAttention,
norms, a user's own module with an ``nn.Parameter``...), every known activation and every pooling layer is
watched, so every trainable parameter of the model is recorded.

Units: the dead and saturated shares of a layer are counted per *unit*, one index along the output's unit
axis. Outputs of convolutions, channel norms (BatchNorm, InstanceNorm, GroupNorm) and pooling are ``(N, C, *)``:
a unit is a channel (axis 1). Outputs of Linear, attention, LayerNorm/RMSNorm, Embedding and recurrent layers
are ``(N, *, F)``: a unit is a feature (the last axis). An activation takes the unit axis of the layer that
produced its input (see :class:`normlab.diagnostics.monitor.Monitor`).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from normlab.diagnostics.stats import SIGMOID, TANH

if TYPE_CHECKING:
    from normlab.diagnostics.storage import Diagnostics

ACTIVATION = "activation"
LINEAR = "linear"
CONV = "conv"
RECURRENT = "recurrent"
ATTENTION = "attention"
EMBEDDING = "embedding"
NORM = "norm"
POOL = "pool"
OTHER = "other"

DEFAULT_FAMILIES = frozenset({ACTIVATION, LINEAR, CONV, RECURRENT, ATTENTION, EMBEDDING, NORM, POOL})
"""Families watched by default; any other module is watched when it owns parameters itself."""

HARD = "hard"
"""A gate whose gradient is exactly zero wherever its output is not positive (ReLU): such units can die."""
SOFT = "soft"
"""A ReLU-like gate with a small but non-zero gradient below zero (GELU, SiLU, LeakyReLU, ELU...)."""

CHANNEL_AXIS = 1
LAST_AXIS = -1

TANH_LIKE = frozenset({"Tanh", "Hardtanh", "Softsign"})
SIGMOID_LIKE = frozenset({"Sigmoid", "Hardsigmoid"})
HARD_GATES = frozenset({"ReLU", "ReLU6"})
SOFT_GATES = frozenset(
    {"LeakyReLU", "PReLU", "RReLU", "ELU", "CELU", "SELU", "GELU", "SiLU", "Mish", "Hardswish"}
)
OTHER_ACTIVATIONS = frozenset(
    {"Softplus", "LogSigmoid", "Tanhshrink", "Softshrink", "Hardshrink", "Softmax", "LogSoftmax", "GLU", "Threshold"}
)
EMBEDDINGS = frozenset({"Embedding", "EmbeddingBag"})
RECURRENTS = frozenset({"RNNBase", "RNN", "LSTM", "GRU", "RNNCellBase", "RNNCell", "LSTMCell", "GRUCell"})
_CONV_NAME = re.compile(r"^_?Conv(Transpose)?(\d+d|Nd)$")
_NORM_NAME = re.compile(r"Norm(\d+d)?$|^_NormBase$|^_BatchNorm$|^_InstanceNorm$")
_CHANNEL_NORM_NAME = re.compile(r"^(Sync)?BatchNorm(\d+d)?$|^InstanceNorm\d+d$|^GroupNorm$|^LocalResponseNorm$|"
                                r"^_BatchNorm$|^_InstanceNorm$")
_POOL_NAME = re.compile(r"Pool(\d+d|Nd)?$")
_SOFT_END = re.compile(r"(GELU|Gelu|SiLU|Silu|Swish|Mish|LeakyReLU|PReLU|(?<!R)ELU)$")


@dataclass(frozen=True)
class LayerKind:
    """What a module is, as far as the diagnostics care.

    ``family`` is one of the family names above; ``bound`` is ``"tanh"`` or ``"sigmoid"`` for bounded
    activations (saturation applies), else None; ``gate`` is :data:`HARD` (dead units apply) or :data:`SOFT`
    (never-positive units are observed, not dead) for ReLU-like activations, else None; ``unit_axis`` is the
    axis of its output that indexes units (:data:`CHANNEL_AXIS` or :data:`LAST_AXIS`), None for activations,
    which take the axis of the layer feeding them.
    """

    family: str
    bound: str | None = None
    gate: str | None = None
    unit_axis: int | None = LAST_AXIS

    @property
    def relu_like(self) -> bool:
        """True for ReLU-like activations, hard or soft."""
        return self.gate is not None


def class_names(module: nn.Module) -> list[str]:
    """Names of the classes in the module's MRO, most specific first."""
    return [cls.__name__ for cls in type(module).__mro__]


def _classify_name(name: str) -> LayerKind | None:
    if name in TANH_LIKE:
        return LayerKind(ACTIVATION, bound=TANH, unit_axis=None)
    if name in SIGMOID_LIKE:
        return LayerKind(ACTIVATION, bound=SIGMOID, unit_axis=None)
    if name in HARD_GATES:
        return LayerKind(ACTIVATION, gate=HARD, unit_axis=None)
    if name in SOFT_GATES:
        return LayerKind(ACTIVATION, gate=SOFT, unit_axis=None)
    if name in OTHER_ACTIVATIONS:
        return LayerKind(ACTIVATION, unit_axis=None)
    if name.endswith("Linear") or name == "Bilinear":
        return LayerKind(LINEAR)
    if _CONV_NAME.match(name):
        return LayerKind(CONV, unit_axis=CHANNEL_AXIS)
    if name in RECURRENTS:
        return LayerKind(RECURRENT)
    if name == "MultiheadAttention":
        return LayerKind(ATTENTION)
    if name in EMBEDDINGS:
        return LayerKind(EMBEDDING)
    if _CHANNEL_NORM_NAME.match(name):
        return LayerKind(NORM, unit_axis=CHANNEL_AXIS)
    if _NORM_NAME.search(name):
        return LayerKind(NORM)
    if _POOL_NAME.search(name):
        return LayerKind(POOL, unit_axis=CHANNEL_AXIS)
    return _classify_other_activation(name)


def _classify_other_activation(name: str) -> LayerKind | None:
    """Activations of other libraries by how their name ends (transformers' ``NewGELUActivation``,
    ``SiLUActivation``, a user's ``FastGELU``...)."""
    core = name.removesuffix("Activation")
    if _SOFT_END.search(core):
        return LayerKind(ACTIVATION, gate=SOFT, unit_axis=None)
    if core.endswith("ReLU"):
        return LayerKind(ACTIVATION, gate=HARD, unit_axis=None)
    if core.endswith("Tanh"):
        return LayerKind(ACTIVATION, bound=TANH, unit_axis=None)
    if core.endswith("Sigmoid") and not core.endswith("LogSigmoid"):
        return LayerKind(ACTIVATION, bound=SIGMOID, unit_axis=None)
    if core != name:
        return LayerKind(ACTIVATION, unit_axis=None)
    return None


def classify(module: nn.Module) -> LayerKind:
    """Classify a module by the first class name in its MRO that the diagnostics recognise."""
    for name in class_names(module):
        kind = _classify_name(name)
        if kind is not None:
            return kind
    return LayerKind(OTHER)


def owns_parameters(module: nn.Module) -> bool:
    """True when the module registers a parameter itself (not only through its children)."""
    return next(module.parameters(recurse=False), None) is not None


def _matches(name: str, module: nn.Module, pattern: type | str) -> bool:
    if isinstance(pattern, type):
        return isinstance(module, pattern)
    return pattern in class_names(module) or fnmatch.fnmatchcase(name, pattern)


def _check_patterns(patterns: Iterable[type | str] | None, argument: str) -> list[type | str]:
    if patterns is None:
        return []
    if isinstance(patterns, (str, type)):
        patterns = [patterns]
    checked = list(patterns)
    for pattern in checked:
        if not isinstance(pattern, (str, type)):
            raise TypeError(
                f"{argument} items must be module types, type names or name globs, got {pattern!r} "
                f"({type(pattern).__name__}); e.g. {argument}=[torch.nn.Tanh, 'Linear', 'blocks.*.mlp']"
            )
    return checked


def select_modules(
    model: nn.Module,
    include: Iterable[type | str] | None = None,
    exclude: Iterable[type | str] | None = None,
) -> list[tuple[str, nn.Module, LayerKind]]:
    """The ``(name, module, kind)`` of every module to watch, in registration order.

    ``include`` (default: every module that owns parameters, every activation and every pooling layer) and
    ``exclude`` hold module types (``isinstance``), class names (any class in the MRO) or globs on the
    qualified module name (``fnmatch``, e.g. ``"blocks.*.ffn.*"``). An ``include`` item that matches nothing
    raises, since it is almost always a typo. The root module is named ``""``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    included = _check_patterns(include, "include")
    excluded = _check_patterns(exclude, "exclude")
    named = list(model.named_modules())
    for pattern in included:
        if not any(_matches(name, module, pattern) for name, module in named):
            examples = ", ".join(repr(name) for name, _ in named[1:5])
            kinds = sorted({type(module).__name__ for _, module in named})
            raise ValueError(
                f"include item {pattern!r} matches no module of {type(model).__name__}; "
                f"module names look like {examples} and the types present are {kinds}"
            )
    selected = []
    for name, module in named:
        kind = classify(module)
        if included:
            wanted = any(_matches(name, module, pattern) for pattern in included)
        else:
            wanted = kind.family in DEFAULT_FAMILIES or owns_parameters(module)
        if wanted and not any(_matches(name, module, pattern) for pattern in excluded):
            selected.append((name, module, kind))
    if not selected:
        raise ValueError(
            f"no module of {type(model).__name__} is selected (include={include!r}, exclude={exclude!r}); "
            "pass include= with module types, type names or name globs"
        )
    return selected


ROOT = "(root)"  # the name a recorded root module goes by


def watched(
    model: nn.Module, include: Iterable[type | str] | None, exclude: Iterable[type | str] | None,
    diagnostics: Diagnostics,
) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, nn.Parameter]]]:
    """The modules a monitor records (`select_modules`) and their trainable parameters, each once, by name;
    their descriptions go into `diagnostics`."""
    from normlab.diagnostics.storage import ModuleInfo, ParameterInfo

    modules, parameters, seen = [], [], set()
    for name, module, kind in select_modules(model, include, exclude):
        name = name or ROOT
        modules.append((name, module))
        diagnostics.modules[name] = ModuleInfo(
            name, type(module).__name__, kind.family, kind.bound, kind.relu_like, gate=kind.gate,
            unit_axis=kind.unit_axis,
        )
        for short, parameter in module.named_parameters(recurse=False):
            if parameter.requires_grad and id(parameter) not in seen:
                seen.add(id(parameter))
                full = short if name == ROOT else f"{name}.{short}"
                diagnostics.parameters[full] = ParameterInfo(
                    full, name, type(module).__name__, tuple(parameter.shape), len(parameters)
                )
                parameters.append((full, parameter))
    return modules, parameters
