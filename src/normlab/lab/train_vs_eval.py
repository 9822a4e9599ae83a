"""train-vs-eval: BatchNorm couples the examples of a batch in training mode and not in eval mode; running
statistics against the batch statistics and the population statistics; val loss with running vs calibrated
statistics.

One `lesson-batchnorm` model (BatchNorm momentum 0.001) is trained; then, in float64, one val example is placed in
several batches of random training examples: its train-mode logits (batch statistics) and eval-mode logits
(running statistics) are compared across batches. The normalised gap |mean_a - mean_b| / std_b between the
batch, running and population (whole train split) statistics of the BatchNorm input is averaged over features.

Budget: tiny 1 run x 300 steps; quick 1 run x 5,000 steps (about 2 s on 2 cores); full 1 run x 20,000 steps
(quiet 2-core time: the README's lab table).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

import torch

from normlab.config import get_preset
from normlab.lab.common import (
    Check,
    Experiment,
    LabData,
    Verdict,
    markdown_table,
    number,
    population_statistics,
    train_config,
)
from normlab.sweeps.runner import SweepRun, run_sweep
from normlab.training import batchnorm_layers, calibrate_batchnorm, evaluate

DIFFERENT, IDENTICAL = 1e-4, 1e-6  # train-mode logits differ by more than / eval-mode logits by at most
CALIBRATION_SLACK = 0.01  # calibrated statistics may cost at most this much val loss over the running ones
BATCH_SIZE = 32
FINAL_EXAMPLES = 1_000  # the sweep's final losses are not used here: the val losses are measured on the whole split

CLAIM = (f"In training mode one example's logits change with the rest of its batch (max abs difference across "
         f"batches > {DIFFERENT:g}); in eval mode they do not (<= {IDENTICAL:g}); and the population statistics "
         f"calibrated on the train split serve at least as well as the running statistics (val loss no more than "
         f"{CALIBRATION_SLACK:g} higher).")


@dataclass(frozen=True)
class Settings:
    """Training steps and the number of batches the example is placed in."""

    steps: int
    batches: int


SETTINGS = {"tiny": Settings(300, 8), "quick": Settings(5_000, 16), "full": Settings(20_000, 32)}


def budget(settings: Settings) -> str:
    """One run, then a probe."""
    return f"1 run x {settings.steps:,} steps; the example in {settings.batches} batches of {BATCH_SIZE}"


def _forward(model: torch.nn.Module, x: torch.Tensor, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and the BatchNorm input of `x`, leaving `model` (its running statistics too) unchanged."""
    model = copy.deepcopy(model).train(training)
    _, norm = batchnorm_layers(model)[0]
    seen = []
    handle = norm.register_forward_hook(lambda _module, inputs, _output: seen.append(inputs[0]))
    with torch.no_grad():
        logits = model(x)
    handle.remove()
    return logits, seen[0]


@torch.no_grad()
def _gap(mean_a: torch.Tensor, mean_b: torch.Tensor, var_b: torch.Tensor) -> float:
    """Mean over features of |mean_a - mean_b| / std_b."""
    return float(((mean_a - mean_b).abs() / var_b.sqrt()).mean())


def measure(settings: Settings, data: LabData, progress: bool) -> dict[str, Any]:
    """Train, then probe the trained model."""
    run = SweepRun("lesson-batchnorm", get_preset("lesson-batchnorm").model, train_config(settings.steps))
    trained = run_sweep([run], data.splits, len(data.vocab), progress=progress, keep_models=True,
                        final_examples=FINAL_EXAMPLES)[0].model
    model = copy.deepcopy(trained).double()
    x_train = data.splits.train[0]
    example = data.splits.val[0][:1]
    generator = torch.Generator().manual_seed(0)
    outputs: dict[str, list[list[float]]] = {"train": [], "eval": []}
    batch_gaps = []
    _, norm = batchnorm_layers(model)[0]
    running_mean, running_var = norm.running_mean, norm.running_var
    for _ in range(settings.batches):
        others = x_train[torch.randint(0, len(x_train), (BATCH_SIZE - 1,), generator=generator)]
        position = int(torch.randint(0, BATCH_SIZE, (1,), generator=generator))
        batch = torch.cat([others[:position], example, others[position:]])
        for mode in ("train", "eval"):
            logits, inputs = _forward(model, batch, mode == "train")
            outputs[mode].append(logits[position].tolist())
            if mode == "train":
                batch_gaps.append(_gap(inputs.mean(0), running_mean, running_var))
    population_mean, population_var = population_statistics(model, x_train)
    calibrated = copy.deepcopy(trained)
    calibrate_batchnorm(calibrated, x_train)
    spread = {mode: float((torch.tensor(rows).amax(0) - torch.tensor(rows).amin(0)).max()) for mode, rows in
              outputs.items()}
    return {"settings": asdict(settings), "logits": outputs, "max_abs_difference": spread,
            "gap_batch_vs_running": sum(batch_gaps) / len(batch_gaps),
            "gap_batch_vs_running_per_batch": batch_gaps,
            "gap_running_vs_population": _gap(running_mean, population_mean, population_var),
            "val_loss_running": evaluate(trained, *data.splits.val),
            "val_loss_calibrated": evaluate(calibrated, *data.splits.val)}


def check(measurements: dict[str, Any]) -> Verdict:
    """Apply the rule of `CLAIM`."""
    train, evaluation = measurements["max_abs_difference"]["train"], measurements["max_abs_difference"]["eval"]
    running, calibrated = measurements["val_loss_running"], measurements["val_loss_calibrated"]
    return Verdict((
        Check("train mode: the batch changes the example's logits", train > DIFFERENT,
              f"max abs difference {train:.3g} (> {DIFFERENT:g})"),
        Check("eval mode: it does not", evaluation <= IDENTICAL, f"max abs difference {evaluation:.3g} "
                                                                 f"(<= {IDENTICAL:g})"),
        Check("calibrated statistics serve as well as running ones", calibrated <= running + CALIBRATION_SLACK,
              f"val loss {calibrated:.4f} calibrated vs {running:.4f} running"),
    ))


def draw(measurements: dict[str, Any]) -> dict[str, Any]:
    """The example's logits in each batch, per mode; the statistic gaps; the val losses."""
    from normlab.diagnostics.figures import new_grid

    figure, axes = new_grid(1, 3, 16.0, 4.5)
    for column, mode in enumerate(("train", "eval")):
        for row in measurements["logits"][mode]:
            axes[0][column].plot(range(len(row)), row, ".", alpha=0.6)
        axes[0][column].set(title=f"{mode} mode: one example's logits in {len(measurements['logits'][mode])} "
                                  "batches", xlabel="next character (index)", ylabel="logit")
    gaps = measurements["gap_batch_vs_running_per_batch"]
    axes[0][2].bar(range(len(gaps)), gaps, color="tab:blue", label="batch vs running (per batch)")
    axes[0][2].axhline(measurements["gap_running_vs_population"], color="tab:red",
                       label="running vs population")
    axes[0][2].set(title="mean |mean_a - mean_b| / std_b of the BatchNorm input", xlabel="batch")
    axes[0][2].legend()
    return {"train_vs_eval": figure}


def table(measurements: dict[str, Any]) -> list[str]:
    """The numbers of the probe."""
    rows = [["max abs logit difference, train mode", number(measurements["max_abs_difference"]["train"], ".3g")],
            ["max abs logit difference, eval mode", number(measurements["max_abs_difference"]["eval"], ".3g")],
            ["mean gap, batch vs running statistics (in std)", number(measurements["gap_batch_vs_running"], ".3f")],
            ["mean gap, running vs population statistics", number(measurements["gap_running_vs_population"], ".3f")],
            ["val loss, running statistics", number(measurements["val_loss_running"], ".4f")],
            ["val loss, calibrated population statistics", number(measurements["val_loss_calibrated"], ".4f")]]
    return markdown_table(["measurement", "value"], rows)


EXPERIMENT = Experiment("train-vs-eval", "BatchNorm in training and in eval mode", CLAIM, SETTINGS, budget, measure,
                        check, draw, table)
