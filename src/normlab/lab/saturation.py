"""saturation: saturated tanh units and dead ReLU units at initialisation against the weight scale, and how they
evolve while training with too high a learning rate.

The lesson's one-hidden-layer MLP (Kaiming hidden weights, then multiplied by the weight scale). Shares are
measured in eval mode on a fixed batch of training examples: saturated = share of tanh outputs beyond ±0.97,
dead = share of ReLU units that are not positive for any example of the batch (`normlab.diagnostics.stats`).
Training uses a constant learning rate, with snapshots every tenth of the run.

Budget (plus 14 models inspected at initialisation): tiny 10 runs x 300 steps; quick 10 runs x 3,000 steps (about
4 s on 2 cores); full 10 runs x 5,000 steps
(quiet 2-core time: the README's lab table).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from normlab.diagnostics.stats import TANH, dead_fraction, saturated_fraction
from normlab.lab.common import (
    Check,
    Experiment,
    LabData,
    Verdict,
    lesson_model,
    markdown_table,
    number,
    train_config,
    training_batch,
)
from normlab.model import build_model
from normlab.sweeps.runner import SweepRun, run_sweep

ACTIVATIONS = ("tanh", "relu")
SCALES = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
LEARNING_RATES = (0.1, 0.5, 1.0, 1.5, 2.0)
LESSON_LR = 0.1
THRESHOLD = 0.97  # |tanh| beyond this is saturated
INIT_LOW, INIT_HIGH = 0.05, 0.5  # saturated share at the smallest / largest weight scale: below / above
HEALTHY, DEAD, SATURATED = 0.05, 0.2, 0.5  # peak shares during training: below / above

CLAIM = (f"At initialisation the share of saturated tanh outputs never falls as the weight scale grows, from below "
         f"{INIT_LOW:.0%} at scale {SCALES[0]:g} to above {INIT_HIGH:.0%} at scale {SCALES[-1]:g}. In training (peak "
         f"share over the snapshots), the lesson's learning rate {LESSON_LR:g} keeps dead ReLU units under "
         f"{HEALTHY:.0%}, while some higher rate of the grid that does not diverge kills over {DEAD:.0%} of them, and "
         f"some higher rate saturates over {SATURATED:.0%} of the tanh outputs.")


@dataclass(frozen=True)
class Settings:
    """Training steps per run, the size of the batch the shares are measured on, and the examples of the final
    losses (None: the whole splits)."""

    steps: int
    examples: int
    final_examples: int | None


SETTINGS = {"tiny": Settings(300, 500, 2_000), "quick": Settings(3_000, 2_000, 20_000),
            "full": Settings(5_000, 5_000, None)}


def budget(settings: Settings) -> str:
    """Models at initialisation and training runs."""
    return (f"{len(SCALES) * len(ACTIVATIONS)} models at initialisation; {len(LEARNING_RATES) * len(ACTIVATIONS)} "
            f"runs x {settings.steps:,} steps")


def hidden_share(model: torch.nn.Module, x: torch.Tensor, activation: str) -> float:
    """Saturated (tanh) or dead (ReLU) share of the first hidden activation of `model` on `x`, in eval mode."""
    outputs = []
    kind = "Tanh" if activation == "tanh" else "ReLU"
    module = next(m for m in model.modules() if type(m).__name__ == kind)
    handle = module.register_forward_hook(lambda _module, _inputs, output: outputs.append(output))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
        model.train(was_training)
    share = saturated_fraction(outputs[0], THRESHOLD, TANH) if activation == "tanh" else dead_fraction(outputs[0])
    return float(share)


def measure(settings: Settings, data: LabData, progress: bool) -> dict[str, Any]:
    """Shares at initialisation per weight scale, and per learning rate over training."""
    x, _ = training_batch(data, settings.examples)
    at_init = {a: [hidden_share(build_model(lesson_model(activation=a, weight_scale=s), len(data.vocab), seed=0), x, a)
                   for s in SCALES] for a in ACTIVATIONS}
    runs = [SweepRun(f"{a} lr {lr:g}", lesson_model(activation=a), train_config(settings.steps, schedule="constant",
                                                                                  lr=lr))
            for a in ACTIVATIONS for lr in LEARNING_RATES]
    snapshots = [settings.steps * k // 10 for k in range(11)]
    results = run_sweep(runs, data.splits, len(data.vocab), progress=progress, snapshot_steps=snapshots,
                        final_examples=settings.final_examples)
    training = []
    for run, result in zip(runs, results):
        activation = run.model.activation
        shares = [None if result.diverged_at is not None and result.diverged_at < step
                  else hidden_share(result.snapshot(step), x, activation) for step in snapshots]
        training.append({"activation": activation, "lr": run.train.lr, "steps": snapshots, "share": shares,
                         "val_loss": result.val_loss, "diverged_at": result.diverged_at})
    return {"settings": asdict(settings), "scales": list(SCALES), "at_init": at_init, "training": training}


def _peaks(measurements: dict[str, Any], activation: str) -> dict[float, float]:
    """The largest share during training (after step 0) of each run of `activation` that did not diverge."""
    return {run["lr"]: max(share for share in run["share"][1:] if share is not None)
            for run in measurements["training"] if run["activation"] == activation and run["diverged_at"] is None}


def check(measurements: dict[str, Any]) -> Verdict:
    """Apply the rule of `CLAIM`."""
    saturated = measurements["at_init"]["tanh"]
    rising = all(b >= a for a, b in zip(saturated, saturated[1:]))
    dead, tanh = _peaks(measurements, "relu"), _peaks(measurements, "tanh")
    dead_lesson = dead.get(LESSON_LR)
    dead_high = max((share for lr, share in dead.items() if lr > LESSON_LR), default=None)
    saturated_high = max((share for lr, share in tanh.items() if lr > LESSON_LR), default=None)
    return Verdict((
        Check("init: saturation grows with the weight scale",
              rising and saturated[0] < INIT_LOW and saturated[-1] > INIT_HIGH,
              "saturated " + ", ".join(f"{s:.1%}" for s in saturated)),
        Check(f"ReLU at lr {LESSON_LR:g}: few dead units", dead_lesson is not None and dead_lesson < HEALTHY,
              f"peak dead share {number(dead_lesson, '.1%')}"),
        Check("ReLU at a higher lr: many dead units", dead_high is not None and dead_high > DEAD,
              f"highest peak dead share of a non-diverged run {number(dead_high, '.1%')}"),
        Check("tanh at a higher lr: saturated", saturated_high is not None and saturated_high > SATURATED,
              f"highest peak saturated share of a non-diverged run {number(saturated_high, '.1%')}"),
    ))


def draw(measurements: dict[str, Any]) -> dict[str, Any]:
    """Shares against the weight scale at initialisation; shares over training per learning rate."""
    from normlab.diagnostics.figures import new_grid

    figure, axes = new_grid(1, 3, 15.0, 4.5)
    for activation, label in (("tanh", "saturated tanh outputs"), ("relu", "dead ReLU units")):
        axes[0][0].semilogx(measurements["scales"], [100 * s for s in measurements["at_init"][activation]], "o-",
                            label=label)
    axes[0][0].set(title="at initialisation", xlabel="weight scale", ylabel="%")
    axes[0][0].legend()
    for column, activation in ((1, "tanh"), (2, "relu")):
        for run in (r for r in measurements["training"] if r["activation"] == activation):
            points = [(step, 100 * share) for step, share in zip(run["steps"], run["share"]) if share is not None]
            suffix = f" (diverged at {run['diverged_at']})" if run["diverged_at"] is not None else ""
            axes[0][column].plot(*zip(*points), marker=".", label=f"lr {run['lr']:g}{suffix}")
        what = "saturated tanh outputs" if activation == "tanh" else "dead ReLU units"
        axes[0][column].set(title=f"{what} while training", xlabel="step", ylabel="%")
        axes[0][column].legend(fontsize="small")
    return {"saturation": figure}


def table(measurements: dict[str, Any]) -> list[str]:
    """Per run: the share at the start, its peak and at the end, the final val loss."""
    rows = []
    for run in measurements["training"]:
        later = [share for share in run["share"][1:] if share is not None]
        rows.append([run["activation"], f"{run['lr']:g}", number(run["share"][0], ".1%"),
                     number(max(later) if later else None, ".1%"), number(run["share"][-1], ".1%"),
                     number(run["val_loss"]), str(run["diverged_at"] if run["diverged_at"] is not None else "")])
    return markdown_table(["activation", "lr", "share at start", "peak share", "share at end", "val loss",
                           "diverged at step"], rows)


EXPERIMENT = Experiment("saturation", "saturated and dead units at initialisation and with too high a learning rate",
                        CLAIM, SETTINGS, budget, measure, check, draw, table)
