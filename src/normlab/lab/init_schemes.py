"""init-schemes: the activation std through a deep MLP at initialisation for naive N(0,1), Xavier and Kaiming
weights, with tanh and with ReLU.

naive: N(0, 1); Xavier (Glorot, gain 1): N(0, 2/(fan_in + fan_out)); Kaiming: N(0, gain²/fan_in) with the
activation's gain (5/3 for tanh, √2 for ReLU). Hidden Linears have no bias; the std of every layer's output is
averaged geometrically over a few seeds (one forward and backward pass each, `inspect_model`).

Budget (no training; 6 schemes x activations, a few seeds each): tiny 10 layers of 200 on 256 examples, 2
seeds; quick 20 layers of 200 on 1,000 examples, 4 seeds (about 5 s on 2 cores); full the same on 1,024 examples,
4 seeds (quiet 2-core time: the README's lab table).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from normlab import nn
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

SCHEMES = ("naive", "xavier", "kaiming")
ACTIVATIONS = ("tanh", "relu")
BAND = (0.5, 2.0)  # "steady": last/first activation std within this range
EXPLODING, VANISHING = 10.0, 0.1
SATURATED = 0.5  # share of the last tanh layer's outputs beyond ±0.97

CLAIM = (f"Kaiming keeps the activation std steady through depth for tanh and ReLU (last/first layer in "
         f"[{BAND[0]}, {BAND[1]}]); naive N(0,1) saturates tanh (> {SATURATED:.0%} of the last layer beyond ±0.97) "
         f"and makes ReLU explode (last/first > {EXPLODING:g}); Xavier without the activation's gain makes ReLU "
         f"vanish (last/first < {VANISHING}) and shrinks tanh more than Kaiming does.")


@dataclass(frozen=True)
class Settings:
    """The deep MLP, the batch and the seeds averaged over."""

    n_layers: int
    n_hidden: int
    examples: int
    seeds: int


SETTINGS = {"tiny": Settings(10, 200, 256, 2), "quick": Settings(20, 200, 1_000, 4),
            "full": Settings(20, 200, 1_024, 4)}


def budget(settings: Settings) -> str:
    """No training: one pass per model and seed."""
    return (f"no training: {len(SCHEMES) * len(ACTIVATIONS)} models of {settings.n_layers} layers x "
            f"{settings.n_hidden}, {settings.seeds} seeds, one pass on {settings.examples:,} examples")


def scheme_config(scheme: str, activation: str, n_layers: int, n_hidden: int) -> ModelConfig:
    """The deep MLP with `scheme` for its hidden weights (Xavier without the activation's gain)."""
    scale = 1.0 / nn.init.calculate_gain(activation) if scheme == "xavier" else 1.0
    return ModelConfig(n_layers=n_layers, n_hidden=n_hidden, activation=activation, init=scheme, weight_scale=scale,
                       hidden_bias=False, output_init="fan_in", output_weight_scale=0.1, output_bias_scale=0.0)


def measure(settings: Settings, data: LabData, progress: bool) -> dict[str, Any]:
    """Per (activation, scheme): the geometric mean over seeds of each layer's output std, the mean share of
    saturated (tanh) or dead (ReLU) units."""
    x, y = training_batch(data, settings.examples)
    curves = []
    for activation in ACTIVATIONS:
        for scheme in SCHEMES:
            config = scheme_config(scheme, activation, settings.n_layers, settings.n_hidden)
            profiles = [layer_profile(build_model(config, len(data.vocab), seed=seed), x, y, activation)
                        for seed in range(settings.seeds)]
            layers = range(settings.n_layers)
            curves.append({
                "activation": activation, "scheme": scheme,
                "act_std": [math.exp(sum(math.log(p["act_std"][i]) for p in profiles) / len(profiles)) for i in layers],
                "share": [sum(p["share"][i] for p in profiles) / len(profiles) for i in layers]})
    return {"settings": asdict(settings), "curves": curves}


def _curve(measurements: dict[str, Any], activation: str, scheme: str) -> dict[str, Any]:
    return next(c for c in measurements["curves"] if c["activation"] == activation and c["scheme"] == scheme)


def _ratio(curve: dict[str, Any]) -> float:
    return curve["act_std"][-1] / curve["act_std"][0]


def check(measurements: dict[str, Any]) -> Verdict:
    """Apply the rule of `CLAIM` to the per-layer stds."""
    kaiming = [_ratio(_curve(measurements, a, "kaiming")) for a in ACTIVATIONS]
    naive_tanh = _curve(measurements, "tanh", "naive")["share"][-1]
    naive_relu = _ratio(_curve(measurements, "relu", "naive"))
    xavier_relu = _ratio(_curve(measurements, "relu", "xavier"))
    xavier_tanh = _ratio(_curve(measurements, "tanh", "xavier"))
    return Verdict((
        Check("Kaiming: steady for tanh and ReLU", all(BAND[0] <= r <= BAND[1] for r in kaiming),
              f"last/first act std: tanh {kaiming[0]:.3g}, ReLU {kaiming[1]:.3g}"),
        Check("naive: tanh saturates", naive_tanh > SATURATED, f"last layer saturated {naive_tanh:.1%}"),
        Check("naive: ReLU explodes", naive_relu > EXPLODING, f"last/first act std {naive_relu:.3g}"),
        Check("Xavier (gain 1): ReLU vanishes", xavier_relu < VANISHING, f"last/first act std {xavier_relu:.3g}"),
        Check("Xavier (gain 1): tanh shrinks more than Kaiming", xavier_tanh < kaiming[0],
              f"last/first act std {xavier_tanh:.3g} vs Kaiming {kaiming[0]:.3g}"),
    ))


def draw(measurements: dict[str, Any]) -> dict[str, Any]:
    """Activation std per layer (log scale), a panel per activation, a line per scheme."""
    from normlab.diagnostics.figures import new_grid

    figure, axes = new_grid(1, 2, 12.0, 4.5)
    for column, activation in enumerate(ACTIVATIONS):
        for scheme in SCHEMES:
            curve = _curve(measurements, activation, scheme)
            axes[0][column].semilogy(range(1, len(curve["act_std"]) + 1), curve["act_std"], marker=".", label=scheme)
        axes[0][column].set_title(f"{activation}: std of each layer's output at initialisation")
        axes[0][column].set_xlabel("layer")
        axes[0][column].legend()
    return {"init_schemes": figure}


def table(measurements: dict[str, Any]) -> list[str]:
    """First/last layer std and the last layer's saturated or dead share."""
    rows = [[c["activation"], c["scheme"], number(c["act_std"][0], ".3g"), number(c["act_std"][-1], ".3g"),
             f"{c['share'][-1]:.1%} {'saturated' if c['activation'] == 'tanh' else 'dead'}"]
            for c in measurements["curves"]]
    return markdown_table(["activation", "scheme", "std first layer", "std last layer", "last layer"], rows)


EXPERIMENT = Experiment("init-schemes", "naive, Xavier and Kaiming initialisation through depth", CLAIM, SETTINGS,
                        budget, measure, check, draw, table)
