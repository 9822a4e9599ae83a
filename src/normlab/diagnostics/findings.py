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

SATURATION_LIMIT = 0.05
"""A tanh/sigmoid-like layer with more than this share of outputs in its flat tails is saturated."""
DEAD_LIMIT = 0.10
"""A ReLU-like layer with more than this share of units never positive in a batch has too many dead units."""
INITIAL_LOSS_RATIO_LIMIT = 1.5
"""An initial loss above this multiple of -log(1/vocab) (the loss of a uniform guess) is confidently wrong."""
UPDATE_TO_DATA_TARGET = 1e-3
"""The lesson's rule of thumb for std(update) / std(weights) per step."""
UPDATE_TO_DATA_FACTOR = 10.0
"""An update:data ratio (median over the run) more than this factor away from the target is flagged."""
GRADIENT_CHANGE_LIMIT = 10.0
"""Gradient std changing by more than this factor from the last layer to the first: vanishing/exploding."""

RULES = {
    "saturation": f"a tanh/sigmoid-like layer has more than {SATURATION_LIMIT:.0%} of its outputs saturated",
    "dead-units": f"a ReLU-like layer has more than {DEAD_LIMIT:.0%} dead units (never positive in a batch)",
    "initial-loss": f"the loss at step 0 is above {INITIAL_LOSS_RATIO_LIMIT}x the uniform-guess loss "
    "-log(1/vocab)",
    "update-to-data": "a weight matrix's median update:data ratio is more than "
    f"{UPDATE_TO_DATA_FACTOR:g}x away from {UPDATE_TO_DATA_TARGET:g}",
    "vanishing-gradients": f"the gradient std shrinks more than {GRADIENT_CHANGE_LIMIT:g}x from the last "
    "layer to the first",
    "exploding-gradients": f"the gradient std grows more than {GRADIENT_CHANGE_LIMIT:g}x from the last "
    "layer to the first",
    "non-finite": "a NaN or Inf appears in a loss, activation, gradient or parameter",
}
"""Every rule's name and what it checks, with its threshold."""

ERROR = "error"
WARNING = "warning"


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
    """Apply every rule of :data:`RULES` to ``diagnostics``; errors first, then by step.

    ``vocab_size`` enables the initial-loss rule (it needs the number of classes).
    """
    if vocab_size is not None and (
        isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2
    ):
        raise ValueError(f"vocab_size must be an int >= 2 (the number of output classes), got {vocab_size!r}")
    findings = _non_finite(diagnostics)
    findings += _saturation(diagnostics) + _dead_units(diagnostics)
    if vocab_size is not None:
        findings += _initial_loss(diagnostics, vocab_size)
    findings += _update_to_data(diagnostics) + _gradient_flow(diagnostics)
    return sorted(findings, key=lambda f: (f.severity != ERROR, f.step, diagnostics.layer_rank(f.layer)))


def _describe(diagnostics: Diagnostics, layer: str) -> str:
    info = diagnostics.modules.get(layer)
    return f"layer {layer!r} ({info.type})" if info is not None else f"{layer!r}"


def _first_above(diagnostics: Diagnostics, layer: str, metric: str, limit: float) -> tuple[int, float, float]:
    """(first step above limit or -1, value there, worst value)."""
    steps, values = diagnostics.series(layer, metric)
    above = np.flatnonzero(values > limit)
    if above.size == 0:
        return -1, math.nan, math.nan
    return int(steps[above[0]]), float(values[above[0]]), float(values[above].max())


def saturation_rule(diagnostics: Diagnostics, layer: str) -> str:
    """The saturation test applied to ``layer``, in words (``|t| > 0.97`` for tanh-like layers)."""
    threshold = diagnostics.settings.get("saturation_threshold", 0.97)
    info = diagnostics.modules.get(layer)
    if info is not None and info.bound == SIGMOID:
        return f"t > {threshold:g} or t < {1 - threshold:.2g}"
    return f"|t| > {threshold:g}"


def _saturation(diagnostics: Diagnostics) -> list[Finding]:
    findings = []
    remedy = (
        "Shrink the preceding layer's weights to gain/sqrt(fan_in) (Kaiming init, gain 5/3 for tanh), "
        "or put a BatchNorm between the linear layer and the nonlinearity."
    )
    for layer in diagnostics.layers(m.ACT_SATURATED):
        step, value, worst = _first_above(diagnostics, layer, m.ACT_SATURATED, SATURATION_LIMIT)
        if step < 0:
            continue
        message = (
            f"{_describe(diagnostics, layer)} has {value:.1%} of its outputs saturated "
            f"({saturation_rule(diagnostics, layer)}) at step {step}, above the {SATURATION_LIMIT:.0%} "
            f"limit (worst {worst:.1%}); there the local gradient is nearly zero, so the layers below "
            "learn little."
        )
        findings.append(Finding("saturation", WARNING, step, layer, message, remedy))
    return findings


def _dead_units(diagnostics: Diagnostics) -> list[Finding]:
    findings = []
    remedy = (
        "Initialise with Kaiming (gain sqrt(2)) and a small or zero bias, lower the learning rate, "
        "or add a BatchNorm before the nonlinearity."
    )
    for layer in diagnostics.layers(m.ACT_DEAD):
        step, value, worst = _first_above(diagnostics, layer, m.ACT_DEAD, DEAD_LIMIT)
        if step < 0:
            continue
        message = (
            f"{_describe(diagnostics, layer)} has {value:.1%} dead units (never positive in the batch) "
            f"at step {step}, above the {DEAD_LIMIT:.0%} limit (worst {worst:.1%}); a dead unit passes "
            "no gradient, so its weights stop learning."
        )
        findings.append(Finding("dead-units", WARNING, step, layer, message, remedy))
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


def _update_to_data(diagnostics: Diagnostics) -> list[Finding]:
    findings = []
    low = UPDATE_TO_DATA_TARGET / UPDATE_TO_DATA_FACTOR
    high = UPDATE_TO_DATA_TARGET * UPDATE_TO_DATA_FACTOR
    for layer in diagnostics.layers(m.UPDATE_TO_DATA):
        info = diagnostics.parameters.get(layer)
        if info is None or len(info.shape) < 2:
            continue  # biases and norm gains start at constants, where the ratio means little
        steps, values = diagnostics.series(layer, m.UPDATE_TO_DATA)
        usable = np.isfinite(values) & (values > 0)
        if not usable.any():
            continue
        median = float(np.median(values[usable]))
        if low <= median <= high:
            continue
        extreme = int(np.argmax(np.abs(np.log10(values[usable] / UPDATE_TO_DATA_TARGET))))
        step = int(steps[usable][extreme])
        too_fast = median > high
        message = (
            f"Weight {layer!r} {tuple(info.shape)} has a median update:data ratio of {median:.1e} "
            f"(10^{math.log10(median):.1f}) over steps {int(steps[0])}-{int(steps[-1])}, more than "
            f"{UPDATE_TO_DATA_FACTOR:g}x {'above' if too_fast else 'below'} the "
            f"{UPDATE_TO_DATA_TARGET:g} rule of thumb (most extreme at step {step}); "
            f"it {'changes too fast' if too_fast else 'barely learns'}."
        )
        remedy = (
            "Lower the learning rate (or scale this layer's init up)."
            if too_fast
            else "Raise the learning rate, or check that this layer's gradients are not vanishing."
        )
        findings.append(Finding("update-to-data", WARNING, step, layer, message, remedy))
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
