"""Which modules of a model to watch, decided by class name only.

The diagnostics never import a layer library: a module is classified by the names of the classes in its MRO,
so ``torch.nn.Tanh``, normlab's own ``Tanh`` and a user's class called ``Tanh`` are all treated alike, and a
subclass inherits its parent's kind (``NonDynamicallyQuantizableLinear`` is a ``Linear``).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from normlab.diagnostics.stats import SIGMOID, TANH

ACTIVATION = "activation"
LINEAR = "linear"
EMBEDDING = "embedding"
NORM = "norm"
OTHER = "other"

DEFAULT_FAMILIES = frozenset({ACTIVATION, LINEAR, EMBEDDING, NORM})

TANH_LIKE = frozenset({"Tanh", "Hardtanh", "Softsign"})
SIGMOID_LIKE = frozenset({"Sigmoid", "Hardsigmoid"})
RELU_LIKE = frozenset(
    {
        "ReLU",
        "ReLU6",
        "LeakyReLU",
        "PReLU",
        "RReLU",
        "ELU",
        "CELU",
        "SELU",
        "GELU",
        "SiLU",
        "Mish",
        "Hardswish",
    }
)
OTHER_ACTIVATIONS = frozenset({"Softplus", "LogSigmoid", "Tanhshrink", "Softshrink", "Hardshrink", "Softmax"})
EMBEDDINGS = frozenset({"Embedding", "EmbeddingBag"})
_NORM_NAME = re.compile(r"Norm(\d+d)?$")


@dataclass(frozen=True)
class LayerKind:
    """What a module is, as far as the diagnostics care.

    ``family`` is one of ``"activation"``, ``"linear"``, ``"embedding"``, ``"norm"``, ``"other"``;
    ``bound`` is ``"tanh"`` or ``"sigmoid"`` for bounded activations (saturation applies), else None;
    ``relu_like`` says whether dead units apply.
    """

    family: str
    bound: str | None = None
    relu_like: bool = False


def class_names(module: nn.Module) -> list[str]:
    """Names of the classes in the module's MRO, most specific first."""
    return [cls.__name__ for cls in type(module).__mro__]


def classify(module: nn.Module) -> LayerKind:
    """Classify a module by the first class name in its MRO that the diagnostics recognise."""
    for name in class_names(module):
        if name in TANH_LIKE:
            return LayerKind(ACTIVATION, bound=TANH)
        if name in SIGMOID_LIKE:
            return LayerKind(ACTIVATION, bound=SIGMOID)
        if name in RELU_LIKE:
            return LayerKind(ACTIVATION, relu_like=True)
        if name in OTHER_ACTIVATIONS:
            return LayerKind(ACTIVATION)
        if name.endswith("Linear"):
            return LayerKind(LINEAR)
        if name in EMBEDDINGS:
            return LayerKind(EMBEDDING)
        if _NORM_NAME.search(name):
            return LayerKind(NORM)
    return LayerKind(OTHER)


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

    ``include`` (default: every activation, Linear, Embedding and norm layer) and ``exclude`` hold module
    types (``isinstance``), class names (any class in the MRO) or globs on the qualified module name
    (``fnmatch``, e.g. ``"blocks.*.ffn.*"``). An ``include`` item that matches nothing raises, since it is
    almost always a typo. The root module is named ``""``.
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
            wanted = kind.family in DEFAULT_FAMILIES
        if wanted and not any(_matches(name, module, pattern) for pattern in excluded):
            selected.append((name, module, kind))
    if not selected:
        raise ValueError(
            f"no module of {type(model).__name__} is selected (include={include!r}, exclude={exclude!r}); "
            "pass include= with module types, type names or name globs"
        )
    return selected
