"""softmax-init: the loss at initialisation against -log(1/vocab) for the lesson's naive output layer (weights and
bias N(0,1)) and the scaled one (weights x0.01, bias 0), and the first steps of training from each.

The hidden layer is the lesson's original one in both (naive N(0,1)); the initial loss is measured on the whole
val split for several seeds, and one run of each is trained to show the "hockey stick" that the naive layer's
confidently wrong start costs.

Budget: tiny 3 seeds, 2 runs x 300 steps; quick 5 seeds, 2 runs x 3,000 steps (about 1 s on 2 cores); full 10
seeds, 2 runs x 10,000 steps (quiet 2-core time: the README's lab table).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from normlab.config import get_preset
from normlab.lab.common import Check, Experiment, LabData, Verdict, markdown_table, number, train_config
from normlab.model import build_model
from normlab.sweeps.runner import SweepRun, run_sweep
from normlab.training import evaluate

LAYERS = {"naive": "lesson-original", "scaled": "lesson-softmax-fix"}  # output layer -> the preset that has it
NAIVE_FACTOR = 2.0  # the naive initial loss is above this multiple of -log(1/vocab)
SCALED_TOLERANCE = 0.1  # the scaled initial loss is within this of -log(1/vocab)

CLAIM = (f"With the naive output layer the initial loss is more than {NAIVE_FACTOR:g}x -log(1/vocab) for every "
         f"seed (confidently wrong); with the scaled one it is within {SCALED_TOLERANCE} of -log(1/vocab) for every "
         "seed.")


@dataclass(frozen=True)
class Settings:
    """Seeds for the initial loss, the training run of each layer, the examples of its loss curve's subset and
    of its final losses (None: the whole splits)."""

    seeds: int
    steps: int
    curve_examples: int
    final_examples: int | None


SETTINGS = {"tiny": Settings(3, 300, 500, 2_000), "quick": Settings(5, 3_000, 2_000, 20_000),
            "full": Settings(10, 10_000, 5_000, None)}


def budget(settings: Settings) -> str:
    """Initial losses of a few seeds, and two short runs."""
    return f"initial loss of {settings.seeds} seeds x 2 layers; 2 runs x {settings.steps:,} steps"


def measure(settings: Settings, data: LabData, progress: bool) -> dict[str, Any]:
    """Initial val losses per seed, and each layer's training curve."""
    initial = {layer: [evaluate(build_model(get_preset(preset).model, len(data.vocab), seed=seed), *data.splits.val)
                       for seed in range(settings.seeds)] for layer, preset in LAYERS.items()}
    runs = [SweepRun(layer, get_preset(preset).model, train_config(settings.steps, evaluations=30,
                                                                    eval_examples=settings.curve_examples, seed=0))
            for layer, preset in LAYERS.items()]
    results = run_sweep(runs, data.splits, len(data.vocab), progress=progress, final_examples=settings.final_examples)
    return {"settings": asdict(settings), "uniform_loss": data.uniform_loss, "initial_loss": initial,
            "curves": {r.name: {"step": [0] + [row["step"] for row in r.rows],
                                "val_loss": [initial[r.name][0]] + [row["val_loss"] for row in r.rows]}
                       for r in results},
            "final_val_loss": {r.name: r.val_loss for r in results}}


def check(measurements: dict[str, Any]) -> Verdict:
    """Apply the rule of `CLAIM` to the initial losses."""
    uniform = measurements["uniform_loss"]
    naive, scaled = measurements["initial_loss"]["naive"], measurements["initial_loss"]["scaled"]
    worst_scaled = max(abs(loss - uniform) for loss in scaled)
    return Verdict((
        Check("naive output layer: confidently wrong", min(naive) > NAIVE_FACTOR * uniform,
              f"lowest initial loss {min(naive):.3f} vs {NAIVE_FACTOR:g} x {uniform:.3f} = "
              f"{NAIVE_FACTOR * uniform:.3f}"),
        Check("scaled output layer: starts at -log(1/vocab)", worst_scaled <= SCALED_TOLERANCE,
              f"initial losses {min(scaled):.3f}..{max(scaled):.3f}, at most {worst_scaled:.3f} from {uniform:.3f}"),
    ))


def draw(measurements: dict[str, Any]) -> dict[str, Any]:
    """Initial loss per seed, and the val loss over the first steps, with -log(1/vocab) as a guide."""
    from normlab.diagnostics.figures import new_grid

    figure, axes = new_grid(1, 2, 12.0, 4.5)
    uniform = measurements["uniform_loss"]
    for layer, losses in measurements["initial_loss"].items():
        axes[0][0].plot(range(len(losses)), losses, "o", label=f"{layer} output layer")
        curve = measurements["curves"][layer]
        axes[0][1].plot(curve["step"], curve["val_loss"], label=f"{layer} output layer")
    for axis in axes[0]:
        axis.axhline(uniform, color="gray", linestyle="--", label="-log(1/vocab)")
        axis.legend()
    axes[0][0].set(title="loss at initialisation (val split)", xlabel="seed", ylabel="loss")
    axes[0][1].set(title="val loss while training", xlabel="step", ylabel="loss", yscale="log")
    return {"softmax_init": figure}


def table(measurements: dict[str, Any]) -> list[str]:
    """Mean initial and final val loss of each layer."""
    rows = [[layer, number(sum(losses) / len(losses)), number(measurements["final_val_loss"][layer])]
            for layer, losses in measurements["initial_loss"].items()]
    return markdown_table(["output layer", "mean initial loss", "val loss after training"], rows) + [
        "", f"-log(1/vocab) = {measurements['uniform_loss']:.3f}."]


EXPERIMENT = Experiment("softmax-init", "the initial loss of a naive and a scaled output layer", CLAIM, SETTINGS,
                        budget, measure, check, draw, table)
