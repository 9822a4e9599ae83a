"""depth: a deep tanh MLP at initialisation, layer by layer, for four weight gains, without a norm and with BatchNorm.

Every hidden Linear (no bias) draws N(0, gain²/fan_in); one forward and backward pass on a batch of training
examples records, for each Tanh, the std of its output, the std of the gradient reaching it, and the share of
saturated outputs (|t| > 0.97), with `normlab.diagnostics.inspect_model`.

Budget (no training; 8 models, one pass each): tiny 20 layers of 64 on 256 examples; quick 50 layers of 200 on
1,000 examples (about 4 s on 2 cores, with the figure); full 50 layers of 200 on 1,024
examples (quiet 2-core time: the README's lab table).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from normlab.config import ModelConfig
from normlab.lab.common import (
    Check,
    Experiment,
    LabData,
    Verdict,
    layer_profile,
    markdown_table,
    number,
    training_batch,
)
from normlab.model import build_model

GAINS = (0.5, 1.0, 5 / 3, 3.0)
NORMS = ("none", "batch")
SEED = 42
BAND = (0.5, 2.0)  # "steady": the last layer's activation std within this factor range of the first layer's
VANISHING = 0.1  # last/first activation std (and first/last gradient std) below this: vanishing
EXPLODING = 10.0  # first/last gradient std above this: exploding towards the input
SATURATED = 0.2  # share of saturated tanh outputs in the last layer above this: saturated
INVARIANT = 0.01  # with BatchNorm, every per-layer statistic within this relative difference across gains

CLAIM = (f"Without a norm, gain 0.5 vanishes (last/first activation std and first/last gradient std < "
         f"{VANISHING}) and gain 3 saturates (> {SATURATED:.0%} of the last layer's tanh outputs beyond ±0.97) "
         f"with gradients exploding towards the input (first/last gradient std > {EXPLODING:g}), while gain 5/3 "
         f"keeps the activation std steady (last/first in [{BAND[0]}, {BAND[1]}]); with BatchNorm every gain "
         f"keeps it steady, and the gain changes no per-layer activation or gradient std by more than "
         f"{INVARIANT:.0%}.")


@dataclass(frozen=True)
class Settings:
    """The deep MLP and the batch it is inspected on."""

    n_layers: int
    n_hidden: int
    examples: int


SETTINGS = {"tiny": Settings(20, 64, 256), "quick": Settings(50, 200, 1_000), "full": Settings(50, 200, 1_024)}


def budget(settings: Settings) -> str:
    """No training: one pass of each model."""
    return (f"no training: {len(GAINS) * len(NORMS)} models of {settings.n_layers} layers x {settings.n_hidden}, "
            f"one forward/backward pass on {settings.examples:,} examples")


def deep_config(n_layers: int, n_hidden: int, norm: str, gain: float) -> ModelConfig:
    """The lesson's deep MLP: bias-free hidden Linears drawn N(0, gain²/fan_in), a small output layer."""
    return ModelConfig(n_layers=n_layers, n_hidden=n_hidden, norm=norm, init="fan_in", weight_scale=gain,
                       hidden_bias=False, output_init="fan_in", output_weight_scale=0.1, output_bias_scale=0.0)


def measure(settings: Settings, data: LabData, progress: bool) -> dict[str, Any]:
    """The per-layer profiles of every (norm, gain)."""
    x, y = training_batch(data, settings.examples)
    curves = []
    for norm in NORMS:
        for gain in GAINS:
            model = build_model(deep_config(settings.n_layers, settings.n_hidden, norm, gain), len(data.vocab),
                                seed=SEED)
            profile = layer_profile(model, x, y, "tanh")
            curves.append({"norm": norm, "gain": gain, "act_std": profile["act_std"],
                           "grad_std": profile["grad_std"], "saturated": profile["share"]})
    return {"settings": asdict(settings), "gains": list(GAINS), "curves": curves}


def _curve(measurements: dict[str, Any], norm: str, gain: float) -> dict[str, Any]:
    return next(c for c in measurements["curves"] if c["norm"] == norm and abs(c["gain"] - gain) < 1e-9)


def _ratio(values: list[float], reverse: bool = False) -> float:
    first, last = values[0], values[-1]
    top, bottom = (first, last) if reverse else (last, first)
    return top / bottom if bottom else float("inf")


def check(measurements: dict[str, Any]) -> Verdict:
    """Apply the rule of `CLAIM` to the per-layer profiles."""
    small, large, right = _curve(measurements, "none", 0.5), _curve(measurements, "none", 3.0), _curve(
        measurements, "none", 5 / 3)
    act_small, grad_small = _ratio(small["act_std"]), _ratio(small["grad_std"], reverse=True)
    grad_large, saturated = _ratio(large["grad_std"], reverse=True), large["saturated"][-1]
    act_right = _ratio(right["act_std"])
    checks = [
        Check("no norm, gain 0.5: activations and gradients vanish", act_small < VANISHING and grad_small < VANISHING,
              f"last/first act std {act_small:.3g}, first/last grad std {grad_small:.3g} (both < {VANISHING})"),
        Check("no norm, gain 3: saturated, gradients explode", saturated > SATURATED and grad_large > EXPLODING,
              f"last layer saturated {saturated:.1%} (> {SATURATED:.0%}), first/last grad std {grad_large:.3g} "
              f"(> {EXPLODING:g})"),
        Check("no norm, gain 5/3: activations steady", BAND[0] <= act_right <= BAND[1],
              f"last/first act std {act_right:.3g} (in [{BAND[0]}, {BAND[1]}])"),
    ]
    batch = [_curve(measurements, "batch", gain) for gain in measurements["gains"]]
    ratios = [_ratio(curve["act_std"]) for curve in batch]
    checks.append(Check("BatchNorm, every gain: activations steady", all(BAND[0] <= r <= BAND[1] for r in ratios),
                        "last/first act std " + ", ".join(f"{r:.3g}" for r in ratios)))
    spread = max(_relative_spread([curve[key][layer] for curve in batch])
                 for key in ("act_std", "grad_std") for layer in range(len(batch[0][key])))
    checks.append(Check("BatchNorm: the gain changes nothing", spread <= INVARIANT,
                        f"largest relative difference across gains {spread:.2e} (<= {INVARIANT})"))
    return Verdict(tuple(checks))


def _relative_spread(values: list[float]) -> float:
    top, bottom = max(values), min(values)
    return (top - bottom) / abs(top) if top else 0.0


def draw(measurements: dict[str, Any]) -> dict[str, Any]:
    """Activation std, gradient std and saturated share per layer: a column per norm, a line per gain."""
    from normlab.diagnostics.figures import new_grid

    figure, axes = new_grid(3, 2, 14.0, 10.0)
    for column, norm in enumerate(NORMS):
        for gain in measurements["gains"]:
            curve = _curve(measurements, norm, gain)
            layers = range(1, len(curve["act_std"]) + 1)
            label = f"gain {gain:.3g}"
            axes[0][column].semilogy(layers, curve["act_std"], label=label)
            axes[1][column].semilogy(layers, curve["grad_std"], label=label)
            axes[2][column].plot(layers, [100 * s for s in curve["saturated"]], label=label)
        title = "no norm" if norm == "none" else "BatchNorm (gains coincide)"
        axes[0][column].set_title(f"{title}: std of each tanh's output")
        axes[1][column].set_title(f"{title}: std of the gradient at each tanh")
        axes[2][column].set_title(f"{title}: saturated outputs (|t| > 0.97), %")
        for row in axes:
            row[column].set_xlabel("layer")
            row[column].legend(fontsize="small")
    for row in axes:  # one scale per row, so that the two columns compare at a glance
        low, high = min(axis.get_ylim()[0] for axis in row), max(axis.get_ylim()[1] for axis in row)
        for axis in row:
            axis.set_ylim(low, high)
    return {"depth": figure}


def table(measurements: dict[str, Any]) -> list[str]:
    """First and last layer of every (norm, gain)."""
    rows = []
    for curve in measurements["curves"]:
        rows.append([curve["norm"], f"{curve['gain']:.3g}", number(curve["act_std"][0], ".3g"),
                     number(curve["act_std"][-1], ".3g"), number(curve["grad_std"][0], ".3g"),
                     number(curve["grad_std"][-1], ".3g"), f"{curve['saturated'][-1]:.1%}"])
    lines = markdown_table(["norm", "gain", "act std first", "act std last", "grad std first", "grad std last",
                            "saturated last"], rows)
    growth = [_ratio(c["grad_std"], reverse=True) for c in measurements["curves"] if c["norm"] == "batch"]
    return lines + ["", f"Not part of the claim: with BatchNorm the gradient std still grows by x{max(growth):.3g} "
                        "from the last layer to the first at this depth (BatchNorm fixes the forward pass; deep "
                        "BatchNorm networks are known to have growing gradients at initialisation)."]


EXPERIMENT = Experiment("depth", "activations and gradients through a deep MLP at initialisation", CLAIM, SETTINGS,
                        budget, measure, check, draw, table)
