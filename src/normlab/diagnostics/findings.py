"""Findings: rules with stated thresholds that turn recorded numbers into plain sentences.

Each rule looks at the recorded diagnostics, and each :class:`Finding` names the rule, the step and layer
where it applies, what was seen (with the threshold), and a remedy from the lesson.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from normlab.diagnostics import metrics as m
from normlab.diagnostics.layers import ACTIVATION
from normlab.diagnostics.stats import SIGMOID
from normlab.diagnostics.storage import Diagnostics

SATURATION_GUIDE = 0.05
"""The lesson's guide: a tanh/sigmoid-like layer with more than this share of outputs in its flat tails is worth a
look (an observation)."""
SATURATION_LIMIT = 0.25
"""More than this share saturated (median over the run) and the layers below learn from few examples: a warning."""
SATURATED_UNITS_LIMIT = 0.05
"""More than this share of units saturated for every example: units whose gradient is nearly zero throughout."""
DEAD_LIMIT = 0.10
"""A ReLU layer with more than this share of units never positive in a batch (median) has too many dead units."""
NEGATIVE_LIMIT = 0.10
"""A GELU/SiLU-like layer with more than this share of units never positive is observed (not dead: see the rule)."""
INITIAL_LOSS_RATIO_LIMIT = 1.5
"""An initial loss above this multiple of -log(1/vocab) (the loss of a uniform guess) is confidently wrong."""
UPDATE_TO_DATA_TARGET = 1e-3
"""The lesson's rule of thumb for std(update) / std(weights) per step."""
UPDATE_TO_DATA_FACTOR = 10.0
"""A median update:data ratio more than this factor away from the target is an observation..."""
UPDATE_TO_DATA_WARNING_FACTOR = 100.0
"""...and more than this factor away, a warning."""
WARM_UP_SHARE = 0.1
"""update:data is judged after the first steps: on the recorded steps past this share of the run."""
GRADIENT_CHANGE_LIMIT = 10.0
"""Gradient std changing by more than this factor from the last layer to the first: vanishing/exploding."""

RULES = {
    "saturation": f"a tanh/sigmoid-like layer has more than {SATURATION_GUIDE:.0%} of its outputs saturated "
    f"(median over the run; a warning above {SATURATION_LIMIT:.0%}, or when more than {SATURATED_UNITS_LIMIT:.0%} "
    "of its units are saturated for every example)",
    "dead-units": f"a ReLU/ReLU6 layer has more than {DEAD_LIMIT:.0%} dead units (never positive in a batch, so "
    "their gradient is exactly zero; median over the run)",
    "negative-units": f"a GELU/SiLU/ELU/LeakyReLU-like layer has more than {NEGATIVE_LIMIT:.0%} of its units never "
    "positive (an observation: their gradient is small, not zero)",
    "initial-loss": f"the loss at step 0 is above {INITIAL_LOSS_RATIO_LIMIT}x the uniform-guess loss "
    "-log(1/vocab)",
    "update-to-data": "a weight matrix's median update:data ratio after the first "
    f"{WARM_UP_SHARE:.0%} of the run is more than {UPDATE_TO_DATA_FACTOR:g}x away from {UPDATE_TO_DATA_TARGET:g} "
    f"(a warning beyond {UPDATE_TO_DATA_WARNING_FACTOR:g}x)",
    "vanishing-gradients": f"the gradient std shrinks more than {GRADIENT_CHANGE_LIMIT:g}x from the last "
    "layer to the first",
    "exploding-gradients": f"the gradient std grows more than {GRADIENT_CHANGE_LIMIT:g}x from the last "
    "layer to the first",
    "non-finite": "a NaN or Inf appears in a loss, activation, gradient or parameter",
}
"""Every rule's name and what it checks, with its threshold."""

ERROR = "error"
"""Training is broken (NaN/Inf)."""
WARNING = "warning"
"""Something the lesson says to fix."""
INFO = "info"
"""An observation worth a look, normal in some healthy models."""
SEVERITIES = (ERROR, WARNING, INFO)


@dataclass(frozen=True)
class Finding:
    """One problem found in the diagnostics: which rule, how bad, where (step, layer), what and what to do."""

    rule: str
    severity: str
    step: int
    layer: str
    message: str
    remedy: str


def find_issues(diagnostics: Diagnostics, vocab_size: int | None = None) -> list[Finding]:
    """Apply every rule of :data:`RULES` to ``diagnostics``; errors first, then warnings, then observations
    (``severity`` ``"error"``, ``"warning"``, ``"info"``), each by step.

    ``vocab_size`` enables the initial-loss rule (it needs the number of classes).
    """
    if vocab_size is not None and (
        isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2
    ):
        raise ValueError(f"vocab_size must be an int >= 2 (the number of output classes), got {vocab_size!r}")
    findings = _non_finite(diagnostics)
    findings += _saturation(diagnostics) + _dead_units(diagnostics) + _negative_units(diagnostics)
    if vocab_size is not None:
        findings += _initial_loss(diagnostics, vocab_size)
    findings += _update_to_data(diagnostics) + _gradient_flow(diagnostics)
    return sorted(
        findings, key=lambda f: (SEVERITIES.index(f.severity), f.step, diagnostics.layer_rank(f.layer))
    )


def _describe(diagnostics: Diagnostics, layer: str) -> str:
    info = diagnostics.modules.get(layer)
    return f"layer {layer!r} ({info.type})" if info is not None else f"{layer!r}"


def _first_above(diagnostics: Diagnostics, layer: str, metric: str, limit: float) -> tuple[int, float]:
    """(first step above limit or -1, value there)."""
    steps, values = diagnostics.series(layer, metric)
    above = np.flatnonzero(values > limit)
    if above.size == 0:
        return -1, math.nan
    return int(steps[above[0]]), float(values[above[0]])


def _median(diagnostics: Diagnostics, layer: str, metric: str) -> float:
    values = diagnostics.series(layer, metric)[1]
    values = values[np.isfinite(values)]
    return float(np.median(values)) if values.size else math.nan


def saturation_rule(diagnostics: Diagnostics, layer: str) -> str:
    """The saturation test applied to ``layer``, in words (``|t| > 0.97`` for tanh-like layers)."""
    threshold = diagnostics.settings.get("saturation_threshold", 0.97)
    info = diagnostics.modules.get(layer)
    if info is not None and info.bound == SIGMOID:
        return f"t > {threshold:g} or t < {1 - threshold:.2g}"
    return f"|t| > {threshold:g}"


_SATURATION_REMEDY = (
    "Shrink the preceding layer's weights to gain/sqrt(fan_in) (Kaiming init, gain 5/3 for tanh), "
    "or put a BatchNorm between the linear layer and the nonlinearity."
)


def _saturation(diagnostics: Diagnostics) -> list[Finding]:
    findings = []
    for layer in diagnostics.layers(m.ACT_SATURATED):
        median = _median(diagnostics, layer, m.ACT_SATURATED)
        units = _median(diagnostics, layer, m.ACT_SATURATED_UNITS)
        if not (median > SATURATION_GUIDE or units > SATURATED_UNITS_LIMIT):
            continue
        warning = median > SATURATION_LIMIT or units > SATURATED_UNITS_LIMIT
        step, value = _first_above(diagnostics, layer, m.ACT_SATURATED, SATURATION_GUIDE)
        if step < 0:
            step, value = _first_above(diagnostics, layer, m.ACT_SATURATED_UNITS, SATURATED_UNITS_LIMIT)
        message = (
            f"{_describe(diagnostics, layer)} has {median:.1%} of its outputs saturated "
            f"({saturation_rule(diagnostics, layer)}; median over the recorded steps, first above "
            f"{SATURATION_GUIDE:.0%} at step {step})"
        )
        if units > 0:
            message += f", and {units:.1%} of its units saturated for every example"
        if warning:
            message += (
                f", above the {SATURATION_LIMIT:.0%} limit (or {SATURATED_UNITS_LIMIT:.0%} of units): there the "
                "local gradient is nearly zero, so the layers below learn from few examples."
            )
        else:
            message += (
                f", above the lesson's {SATURATION_GUIDE:.0%} guide but below the {SATURATION_LIMIT:.0%} limit: "
                "common with Kaiming init (gain 5/3); worth a look if training stalls."
            )
        findings.append(Finding("saturation", WARNING if warning else INFO, step, layer, message,
                                _SATURATION_REMEDY))
    return findings


def _dead_units(diagnostics: Diagnostics) -> list[Finding]:
    findings = []
    remedy = (
        "Initialise with Kaiming (gain sqrt(2)) and a small or zero bias, lower the learning rate, "
        "or add a BatchNorm before the nonlinearity."
    )
    for layer in diagnostics.layers(m.ACT_DEAD):
        median = _median(diagnostics, layer, m.ACT_DEAD)
        if not median > DEAD_LIMIT:
            continue
        step, value = _first_above(diagnostics, layer, m.ACT_DEAD, DEAD_LIMIT)
        message = (
            f"{_describe(diagnostics, layer)} has {median:.1%} dead units (never positive in the batch; median "
            f"over the recorded steps, first above the {DEAD_LIMIT:.0%} limit at step {step} with {value:.1%}): "
            "its gradient is exactly zero wherever its output is not positive, so a dead unit passes no "
            "gradient and the weights feeding it stop learning."
        )
        findings.append(Finding("dead-units", WARNING, step, layer, message, remedy))
    return findings


def _negative_units(diagnostics: Diagnostics) -> list[Finding]:
    findings = []
    remedy = (
        "Usually harmless; if many units stay there, check the init scale and bias of the layer before it, "
        "or add a norm layer before the nonlinearity."
    )
    for layer in diagnostics.layers(m.ACT_NEGATIVE):
        median = _median(diagnostics, layer, m.ACT_NEGATIVE)
        if not median > NEGATIVE_LIMIT:
            continue
        step, _ = _first_above(diagnostics, layer, m.ACT_NEGATIVE, NEGATIVE_LIMIT)
        kind = diagnostics.modules[layer].type if layer in diagnostics.modules else "this activation"
        message = (
            f"{_describe(diagnostics, layer)} has {median:.1%} of its units never positive in the batch "
            f"(median over the recorded steps, first above {NEGATIVE_LIMIT:.0%} at step {step}): they sit on "
            f"{kind}'s negative side, where the output is near zero. They are not dead: there {kind}'s gradient "
            "is small but not zero, so they still learn, more slowly, and can recover."
        )
        findings.append(Finding("negative-units", INFO, step, layer, message, remedy))
    return findings


def _initial_loss(diagnostics: Diagnostics, vocab_size: int) -> list[Finding]:
    loss = diagnostics.value(m.GLOBAL, m.LOSS, 0)
    expected = math.log(vocab_size)
    if loss is None or not math.isfinite(loss) or loss <= INITIAL_LOSS_RATIO_LIMIT * expected:
        return []
    message = (
        f"The loss at step 0 is {loss:.2f}, more than {INITIAL_LOSS_RATIO_LIMIT}x the {expected:.2f} "
        f"of a uniform guess over {vocab_size} classes (-log(1/{vocab_size})): the output layer is "
        "confidently wrong, and the first steps are spent squashing its logits instead of learning."
    )
    remedy = (
        "Scale the output layer's weights by 0.1 (or less) and zero its bias at initialisation, "
        "so the first logits are nearly equal."
    )
    return [Finding("initial-loss", WARNING, 0, m.GLOBAL, message, remedy)]


def _judged_window(steps: np.ndarray) -> np.ndarray:
    """Which recorded steps update:data is judged on: past the warm-up (the first steps, where a layer scaled
    down at init, like the lesson's output layer, moves fast relative to its small weights)."""
    if steps.size < 2:
        return np.ones(steps.size, dtype=bool)
    start = steps[0] + WARM_UP_SHARE * (steps[-1] - steps[0])
    window = (steps > steps[0]) & (steps >= start)
    return window if window.any() else steps == steps[-1]


def _init_scale_note(diagnostics: Diagnostics, layer: str, weights: list[str]) -> str:
    """A remark when the layer's weights started much smaller than the model's other weight matrices."""
    first = {}
    for name in weights:
        steps, values = diagnostics.series(name, m.PARAM_STD)
        if steps.size and values[0] > 0:
            first[name] = float(values[0])
    others = [value for name, value in first.items() if name != layer]
    if layer not in first or not others or first[layer] * 10 > float(np.median(others)):
        return ""
    return (
        f" Its weights started {float(np.median(others)) / first[layer]:.0f}x smaller than the model's other "
        "weight matrices (scaled down at init), which inflates the ratio until they grow."
    )


def _update_to_data(diagnostics: Diagnostics) -> list[Finding]:
    findings = []
    low, high = UPDATE_TO_DATA_TARGET / UPDATE_TO_DATA_FACTOR, UPDATE_TO_DATA_TARGET * UPDATE_TO_DATA_FACTOR
    weights = [
        layer for layer in diagnostics.layers(m.UPDATE_TO_DATA)
        if layer in diagnostics.parameters and len(diagnostics.parameters[layer].shape) >= 2
    ]  # biases and norm gains start at constants, where the ratio means little
    for layer in weights:
        info = diagnostics.parameters[layer]
        steps, values = diagnostics.series(layer, m.UPDATE_TO_DATA)
        window = _judged_window(steps)
        steps, values = steps[window], values[window]
        usable = np.isfinite(values) & (values > 0)
        if not usable.any():
            continue
        median = float(np.median(values[usable]))
        if low <= median <= high:
            continue
        factor = median / UPDATE_TO_DATA_TARGET if median > high else UPDATE_TO_DATA_TARGET / median
        warning = factor > UPDATE_TO_DATA_WARNING_FACTOR
        extreme = int(np.argmax(np.abs(np.log10(values[usable] / UPDATE_TO_DATA_TARGET))))
        step = int(steps[usable][extreme])
        too_fast = median > high
        message = (
            f"Weight {layer!r} {tuple(info.shape)} has a median update:data ratio of {median:.1e} "
            f"(10^{math.log10(median):.1f}) over steps {int(steps[0])}-{int(steps[-1])}, {factor:.0f}x "
            f"{'above' if too_fast else 'below'} the {UPDATE_TO_DATA_TARGET:g} rule of thumb (most extreme at "
            f"step {step}); it {'changes too fast' if too_fast else 'barely learns'}"
            + (f" (beyond the {UPDATE_TO_DATA_WARNING_FACTOR:g}x limit)." if warning else
               f" (within {UPDATE_TO_DATA_WARNING_FACTOR:g}x: an observation).")
        )
        if too_fast:
            message += _init_scale_note(diagnostics, layer, weights)
        remedy = (
            "Lower the learning rate (or scale this layer's init up)."
            if too_fast
            else "Raise the learning rate, or check that this layer's gradients are not vanishing."
        )
        findings.append(Finding("update-to-data", WARNING if warning else INFO, step, layer, message, remedy))
    return findings


def _gradient_layers(diagnostics: Diagnostics) -> list[str]:
    layers = [layer for layer in diagnostics.layers(m.GRAD_STD) if layer in diagnostics.modules]
    activations = [layer for layer in layers if diagnostics.modules[layer].family == ACTIVATION]
    # the lesson compares the nonlinearities; without any, all recorded layers but the output
    return activations if len(activations) >= 2 else layers[:-1]


_VANISHING_REMEDY = (
    "Raise the init gain (5/3 for tanh, sqrt(2) for ReLU: Kaiming init), add BatchNorm or LayerNorm, "
    "or residual connections."
)
_EXPLODING_REMEDY = (
    "Lower the init gain (Kaiming init instead of larger weights), add BatchNorm or LayerNorm, "
    "clip gradients, or lower the learning rate."
)


def _gradient_flow(diagnostics: Diagnostics) -> list[Finding]:
    layers = _gradient_layers(diagnostics)
    if len(layers) < 2:
        return []
    first, last = layers[0], layers[-1]
    findings: dict[str, Finding] = {}
    for step in diagnostics.steps():
        first_std = diagnostics.value(first, m.GRAD_STD, step)
        last_std = diagnostics.value(last, m.GRAD_STD, step)
        if first_std is None or last_std is None or not (last_std > 0 and math.isfinite(first_std)):
            continue
        ratio = first_std / last_std
        if ratio < 1 / GRADIENT_CHANGE_LIMIT:
            rule, change, verb, remedy = (
                "vanishing-gradients",
                f"{1 / ratio:.0f}x smaller" if ratio > 0 else "zero, infinitely smaller",
                "vanish",
                _VANISHING_REMEDY,
            )
        elif ratio > GRADIENT_CHANGE_LIMIT:
            rule, change, verb, remedy = (
                "exploding-gradients",
                f"{ratio:.0f}x larger",
                "explode",
                _EXPLODING_REMEDY,
            )
        else:
            continue
        if rule in findings:
            continue
        message = (
            f"At step {step} the gradient std at the first layer {first!r} ({first_std:.2e}) is {change} "
            f"than at the last layer {last!r} ({last_std:.2e}), beyond the {GRADIENT_CHANGE_LIMIT:g}x "
            f"limit: gradients {verb} on their way down."
        )
        findings[rule] = Finding(rule, WARNING, step, first, message, remedy)
    return list(findings.values())


def _non_finite(diagnostics: Diagnostics) -> list[Finding]:
    # (step, phase, rank, layer, description): sorted, the first hit is where the damage shows first, in the
    # order a step computes things: forward outputs, then parameters, the loss, the backward pass
    hits: list[tuple[int, int, tuple, str, str]] = []
    phases = (
        (m.ACT_NONFINITE, "the output of"),
        (m.PARAM_NONFINITE, "the values of"),
        (m.LOSS, "the loss"),
        (m.GRAD_NONFINITE, "the gradient of the output of"),
        (m.PARAM_GRAD_NONFINITE, "the gradient of"),
    )
    for phase, (metric, what) in enumerate(phases):
        for layer in diagnostics.layers(metric):
            steps, values = diagnostics.series(layer, metric)
            bad = ~np.isfinite(values) if metric == m.LOSS else values > 0
            rank = diagnostics.layer_rank(layer)
            place = f"{what} {layer!r}" if layer else what
            hits += [(int(step), phase, rank, layer, place) for step in steps[bad]]
    if not hits:
        return []
    hits.sort()
    step = hits[0][0]
    at_step = [hit for hit in hits if hit[0] == step]
    places = ", ".join(hit[4] for hit in at_step[:5]) + (", ..." if len(at_step) > 5 else "")
    message = f"NaN or Inf first appears at step {step}, in {places} ({len(hits)} occurrences over the run)."
    remedy = (
        "Lower the learning rate, clip gradients, and check the inputs and any log, division or exp "
        "in the model; the first place listed is where the damage shows first in the step."
    )
    return [Finding("non-finite", ERROR, step, hits[0][3], message, remedy)]
