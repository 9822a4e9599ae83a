"""What every experiment of the lab shares: its description, the data, verdicts, and the lesson's base configs.

An experiment is four functions around a settings dataclass (one per mode): `measure` trains or inspects models
and returns plain JSON-ready measurements; `check` turns measurements into a `Verdict` by a stated rule, so a
rule can be tested on crafted numbers; `draw` makes matplotlib figures of the measurements; `table` gives the
Markdown lines of the summary. The runner (`normlab.lab.runner`) calls them and writes the files.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from normlab.config import ModelConfig, TrainConfig, get_preset
from normlab.data import Splits, Vocab, load_words, make_splits, random_subset
from normlab.diagnostics import inspect_model
from normlab.diagnostics import metrics as metric
from normlab.errors import DataError
from normlab.training import batchnorm_layers

MODES = ("tiny", "quick", "full")  # tiny: for the tests; quick: under a minute each; full: the documented run
HOLDS, DOES_NOT_HOLD = "HOLDS", "DOES NOT HOLD"
BLOCK_SIZE = 3  # the lesson's context length, shared by every experiment


@dataclass
class LabData:
    """The words of the lab (the bundled names unless a file is given), split as the lesson splits them."""

    vocab: Vocab
    splits: Splits
    path: str | None

    @classmethod
    def load(cls, path: str | Path | None = None) -> LabData:
        """Read and split the words of `path` (None: the bundled names); the val split must not be empty."""
        words = load_words(path)
        vocab = Vocab.from_words(words)
        splits = make_splits(words, vocab, BLOCK_SIZE)
        if len(splits.val[0]) == 0:
            raise DataError(f"{len(words)} words leave the validation split empty: the lab needs at least 10 "
                            "words (a few thousand for meaningful numbers)")
        return cls(vocab, splits, None if path is None else str(Path(path).resolve()))

    @property
    def val_examples(self) -> int:
        """The size of the val split. As a sweep's `final_examples`, it gives final val losses on the whole val
        split and final train losses on as many training examples (not the whole train split, 8x as long)."""
        return len(self.splits.val[0])

    @property
    def uniform_loss(self) -> float:
        """-log(1/vocab size): the loss of a model that predicts every character equally."""
        return math.log(len(self.vocab))


@dataclass(frozen=True)
class Check:
    """One numeric condition of a claim: what was checked, what was measured, and whether it passed."""

    name: str
    passed: bool
    measured: str


@dataclass(frozen=True)
class Verdict:
    """The checks of a claim; it holds when every check passed (and there is at least one)."""

    checks: tuple[Check, ...]

    @property
    def holds(self) -> bool:
        """True when every check passed."""
        return bool(self.checks) and all(check.passed for check in self.checks)

    @property
    def text(self) -> str:
        """HOLDS or DOES NOT HOLD."""
        return HOLDS if self.holds else DOES_NOT_HOLD


@dataclass(frozen=True)
class Experiment:
    """One claim of the lesson: how to measure it in each mode, the rule that checks it, how to draw it."""

    name: str
    title: str
    claim: str  # the rule `check` applies, in words
    settings: Mapping[str, Any]  # mode -> the experiment's settings dataclass
    budget: Callable[[Any], str]  # settings -> e.g. "14 runs x 2,000 steps"
    measure: Callable[[Any, LabData, bool], dict[str, Any]]  # (settings, data, progress) -> measurements
    check: Callable[[dict[str, Any]], Verdict]
    draw: Callable[[dict[str, Any]], dict[str, Any]]  # measurements -> {file stem: matplotlib Figure}
    table: Callable[[dict[str, Any]], list[str]]  # measurements -> Markdown lines

    def budgets(self) -> dict[str, str]:
        """The quick and full budgets in words."""
        return {mode: self.budget(self.settings[mode]) for mode in ("quick", "full")}


def finite(value: Any) -> bool:
    """True for a real, finite number (None, NaN and Inf are not)."""
    return isinstance(value, (int, float)) and math.isfinite(value)


def loss_or_inf(value: Any) -> float:
    """A loss for comparisons: NaN, Inf and None (a diverged or missing run) count as +Inf."""
    return float(value) if finite(value) else math.inf


def pooled_std(groups: list[list[Any]]) -> float:
    """The pooled standard deviation of several groups (e.g. the seeds of each configuration): √(Σ squared deviations
    from each group's mean / Σ (n - 1)) over the finite values of each group; NaN when no group has two."""
    squares, freedom = 0.0, 0
    for values in groups:
        kept = [float(v) for v in values if finite(v)]
        if len(kept) > 1:
            mean = sum(kept) / len(kept)
            squares += sum((v - mean) ** 2 for v in kept)
            freedom += len(kept) - 1
    return math.sqrt(squares / freedom) if freedom else math.nan


def number(value: Any, spec: str = ".3f") -> str:
    """`value` formatted with `spec`, or 'n/a' when it is not a finite number."""
    return format(value, spec) if finite(value) else "n/a"


def lesson_model(**overrides: Any) -> ModelConfig:
    """The lesson's well-initialised MLP (`lesson-kaiming`: Kaiming hidden weights, output weights x0.01, output
    bias 0), with `overrides` applied."""
    return replace(get_preset("lesson-kaiming").model, **overrides)


def train_config(steps: int, evaluations: int = 1, eval_examples: int = 2_000, **overrides: Any) -> TrainConfig:
    """The lesson's SGD recipe for `steps` steps (learning rate x0.1 at half), with `evaluations` evenly spaced
    evaluations of the losses on fixed subsets of `eval_examples` examples (the metrics rows of a run)."""
    return TrainConfig(steps=steps, eval_every=max(1, steps // evaluations), eval_examples=eval_examples,
                       checkpoint_every=steps, **overrides)


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Lines of a Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def training_batch(data: LabData, examples: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random batch of at most `examples` training examples (drawn without replacement)."""
    return random_subset(data.splits.train, examples, torch.Generator().manual_seed(seed))


def layer_profile(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, activation: str) -> dict[str, list]:
    """Per activation layer, in order: output std, std of the gradient reaching it, saturated (tanh) or dead (ReLU)
    share, from one forward and backward pass."""
    name = "Tanh" if activation == "tanh" else "ReLU"
    diagnostics = inspect_model(model, x, y, include=[name])
    layers = diagnostics.layers(metric.ACT_STD)
    share = metric.ACT_SATURATED if activation == "tanh" else metric.ACT_DEAD
    return {"act_std": [diagnostics.value(layer, metric.ACT_STD, 0) for layer in layers],
            "grad_std": [diagnostics.value(layer, metric.GRAD_STD, 0) for layer in layers],
            "share": [diagnostics.value(layer, share, 0) for layer in layers]}


@torch.no_grad()
def population_statistics(model: torch.nn.Module, x: torch.Tensor, chunk: int = 16_384
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (biased) variance over all of `x` of the input of the model's first BatchNorm, in float64."""
    _, norm = batchnorm_layers(model)[0]
    seen = []
    handle = norm.register_forward_hook(lambda _module, inputs, _output: seen.append(inputs[0].double()))
    was_training = model.training
    model.eval()
    total = total_of_squares = 0.0
    try:
        for start in range(0, len(x), chunk):
            model(x[start:start + chunk])
            inputs = seen.pop()
            total = total + inputs.sum(0)
            total_of_squares = total_of_squares + inputs.square().sum(0)
    finally:
        handle.remove()
        model.train(was_training)
    mean = total / len(x)
    return mean, total_of_squares / len(x) - mean.square()


def tracking_error(model: torch.nn.Module, population: tuple[torch.Tensor, torch.Tensor]) -> float:
    """RMS over features of the running mean's and std's error against the population's (see the module)."""
    _, norm = batchnorm_layers(model)[0]
    mean, var = population
    mean_error = (norm.running_mean.double() - mean) / var.sqrt()
    std_error = 0.5 * torch.log(norm.running_var.double() / var)
    return math.sqrt(float(torch.cat([mean_error, std_error]).square().mean()))
