"""temperature: entropy, share of unique words, share of words not in the training split, and mean length of
samples for temperatures from 0.3 to 2.

One `lesson-kaiming` model is trained, then the same number of words is sampled at each temperature (the same
seed each time). The entropy is the mean entropy (nats) of the distributions each character was drawn from.

Budget: tiny 1 run x 500 steps, 200 words per temperature; quick 1 run x 5,000 steps, 1,000 words (about 1 s on
2 cores); full 1 run x 10,000 steps, 5,000 words
(quiet 2-core time: the README's lab table).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from normlab.config import get_preset
from normlab.lab.common import Check, Experiment, LabData, Verdict, markdown_table, number, train_config
from normlab.sample import diversity, sample_words
from normlab.sweeps.runner import SweepRun, run_sweep

TEMPERATURES = (0.3, 0.5, 0.7, 1.0, 1.3, 1.6, 2.0)
NOISE = 0.01  # share unique may dip by this much between neighbouring temperatures (sampling noise)

CLAIM = ("Temperature flattens the samples: the mean entropy per character rises strictly with the temperature over "
         f"the whole grid, and the share of unique words never falls by more than {NOISE:g} (sampling noise) from "
         "one temperature to the next.")


@dataclass(frozen=True)
class Settings:
    """Training steps and words sampled per temperature."""

    steps: int
    words: int


SETTINGS = {"tiny": Settings(500, 200), "quick": Settings(5_000, 1_000), "full": Settings(10_000, 5_000)}
FINAL_EXAMPLES = 1_000  # the sweep's final losses are not used here


def budget(settings: Settings) -> str:
    """One run, then sampling."""
    return f"1 run x {settings.steps:,} steps; {settings.words:,} words at each of {len(TEMPERATURES)} temperatures"


def measure(settings: Settings, data: LabData, progress: bool) -> dict[str, Any]:
    """Train, then sample at each temperature and measure the samples."""
    run = SweepRun("lesson-kaiming", get_preset("lesson-kaiming").model, train_config(settings.steps))
    model = run_sweep([run], data.splits, len(data.vocab), progress=progress, keep_models=True,
                      final_examples=FINAL_EXAMPLES)[0].model
    rows, examples = [], {}
    for temperature in TEMPERATURES:
        samples = sample_words(model, data.vocab, settings.words, temperature=temperature, seed=0)
        rows.append(asdict(diversity(samples, data.splits.train_words)) | {"temperature": temperature})
        examples[str(temperature)] = samples.words[:10]
    return {"settings": asdict(settings), "rows": rows, "examples": examples}


def check(measurements: dict[str, Any]) -> Verdict:
    """Apply the rule of `CLAIM`."""
    entropy = [row["mean_entropy"] for row in measurements["rows"]]
    unique = [row["share_unique"] for row in measurements["rows"]]
    worst_dip = max((a - b for a, b in zip(unique, unique[1:])), default=0.0)
    return Verdict((
        Check("entropy rises with the temperature", all(b > a for a, b in zip(entropy, entropy[1:])),
              "entropy " + ", ".join(f"{e:.3f}" for e in entropy)),
        Check("share unique does not fall", worst_dip <= NOISE,
              "unique " + ", ".join(f"{u:.1%}" for u in unique) + f" (largest fall {max(worst_dip, 0):.3f})"),
    ))


def draw(measurements: dict[str, Any]) -> dict[str, Any]:
    """Each measure of the samples against the temperature."""
    from normlab.diagnostics.figures import new_grid

    figure, axes = new_grid(1, 3, 15.0, 4.5)
    temperatures = [row["temperature"] for row in measurements["rows"]]
    axes[0][0].plot(temperatures, [row["mean_entropy"] for row in measurements["rows"]], "o-")
    axes[0][0].set(title="mean entropy per character", xlabel="temperature", ylabel="nats")
    for key, label in (("share_unique", "unique"), ("share_novel", "not in the training split")):
        axes[0][1].plot(temperatures, [100 * row[key] for row in measurements["rows"]], "o-", label=label)
    axes[0][1].set(title="share of the sampled words", xlabel="temperature", ylabel="%")
    axes[0][1].legend()
    axes[0][2].plot(temperatures, [row["mean_length"] for row in measurements["rows"]], "o-")
    axes[0][2].set(title="mean word length", xlabel="temperature", ylabel="characters")
    return {"temperature": figure}


def table(measurements: dict[str, Any]) -> list[str]:
    """The measures per temperature, with a few sampled words."""
    rows = [[f"{row['temperature']:g}", number(row["mean_entropy"]), f"{row['share_unique']:.1%}",
             f"{row['share_novel']:.1%}", number(row["mean_length"], ".2f"),
             ", ".join(measurements["examples"][str(row["temperature"])][:5])] for row in measurements["rows"]]
    return markdown_table(["temperature", "entropy", "unique", "novel", "mean length", "first samples"], rows)


EXPERIMENT = Experiment("temperature", "sampling temperature against the diversity of samples", CLAIM, SETTINGS,
                        budget, measure, check, draw, table)
