"""The verdict rules on crafted measurements: hand-made numbers for which each claim holds, and one change at a
time that breaks it (the rule must then say DOES NOT HOLD, naming the failing check)."""

from __future__ import annotations

import copy

import pytest

from normlab.lab import DOES_NOT_HOLD, EXPERIMENTS, HOLDS, recipe_differences


def _depth() -> dict:
    curves = [{"norm": "none", "gain": 0.5, "act_std": [0.5, 0.01], "grad_std": [1e-6, 1e-3], "saturated": [0, 0]},
              {"norm": "none", "gain": 1.0, "act_std": [0.6, 0.2], "grad_std": [1e-4, 1e-3], "saturated": [0, 0]},
              {"norm": "none", "gain": 5 / 3, "act_std": [0.7, 0.65], "grad_std": [1e-2, 1e-3],
               "saturated": [0.1, 0.05]},
              {"norm": "none", "gain": 3.0, "act_std": [0.9, 0.85], "grad_std": [0.1, 1e-3], "saturated": [0.5, 0.4]}]
    curves += [{"norm": "batch", "gain": g, "act_std": [0.63, 0.62], "grad_std": [0.01, 1e-5],
                "saturated": [0.03, 0.03]} for g in (0.5, 1.0, 5 / 3, 3.0)]
    return {"gains": [0.5, 1.0, 5 / 3, 3.0], "curves": curves}


def _init_schemes() -> dict:
    table = {("tanh", "naive"): ([0.9, 0.95], [0.7, 0.8]), ("tanh", "xavier"): ([0.5, 0.2], [0, 0]),
             ("tanh", "kaiming"): ([0.75, 0.65], [0.2, 0.05]), ("relu", "naive"): ([3.0, 1e9], [0, 0.1]),
             ("relu", "xavier"): ([0.3, 1e-3], [0, 0.1]), ("relu", "kaiming"): ([0.8, 1.0], [0, 0.1])}
    return {"curves": [{"activation": a, "scheme": s, "act_std": std, "share": share}
                       for (a, s), (std, share) in table.items()]}


def _saturation() -> dict:
    def run(activation, lr, end, diverged=None):
        return {"activation": activation, "lr": lr, "steps": [0, 100], "share": [0.0, end], "val_loss": 2.5,
                "diverged_at": diverged}

    return {"scales": [0.1, 1, 5, 10], "at_init": {"tanh": [0.0, 0.01, 0.2, 0.6], "relu": [0, 0, 0, 0]},
            "training": [run("relu", 0.1, 0.0), run("relu", 1.5, 0.3), run("tanh", 0.1, 0.2), run("tanh", 2.0, 0.9)]}


def _init_sensitivity() -> dict:
    losses = {"none": [2.3, 2.8], "batch": [2.3, 2.4]}
    return {"runs": [{"norm": norm, "scale": scale, "val_loss": loss}
                     for norm, values in losses.items() for scale, loss in zip((0.1, 10), values)]}


def _learning_rate() -> dict:
    losses = {"none": {0.1: 2.3, 0.3: 2.35, 1.0: 2.6, 3.0: 3.2}, "batch": {0.1: 2.3, 1.0: 2.35, 3.0: 2.6, 10.0: None}}
    return {"uniform_loss": 3.3, "runs": [{"norm": norm, "lr": lr, "val_loss": loss}
                                          for norm, values in losses.items() for lr, loss in values.items()]}


def _train_vs_eval() -> dict:
    return {"max_abs_difference": {"train": 0.5, "eval": 0.0}, "val_loss_running": 2.30, "val_loss_calibrated": 2.28}


def _momentum() -> dict:
    early = [0.3, 0.1, 0.02, 0.02, 0.04, 0.07, 0.1]
    end = [0.01, 0.005, 0.009, 0.017, 0.04, 0.08, 0.1]
    return {"momenta": [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 0.5], "tracking_error": [list(p) for p in zip(early, end)]}


def _affine() -> dict:
    return {"identity_error": 1e-15, "val_loss": {"affine": [2.30, 2.31, 2.32], "plain": [2.31, 2.32, 2.33]}}


def _temperature() -> dict:
    entropy, unique = [0.9, 1.5, 2.3, 2.8, 3.0], [0.3, 0.7, 0.95, 0.99, 0.985]
    return {"rows": [{"temperature": t, "mean_entropy": e, "share_unique": u}
                     for t, e, u in zip((0.3, 0.7, 1.0, 1.5, 2.0), entropy, unique)]}


def _softmax_init() -> dict:
    return {"uniform_loss": 3.2958, "initial_loss": {"naive": [20.0, 25.0], "scaled": [3.29, 3.30]}}


def _seeds() -> dict:
    return {"val_loss": {"none": [2.30, 2.31, 2.32], "batch": [2.40, 2.41, 2.42], "layer": [2.35, 2.36, 2.37]}}


def _batch_coupling() -> dict:
    per_example = [2.8, 2.4, 2.45]  # small-batch gap 0.4, BatchNorm's 0.6
    losses = {"none": [2.9, 2.4, 2.4], "batch": [3.0, 2.4, 2.5]}
    losses.update({norm: list(per_example) for norm in ("layer", "group", "rms")})
    return {"batch_sizes": [2, 32, 256], "val_loss": losses}


def _data_parallel() -> dict:
    return {"ranks": [1, 2, 4],
            "val_loss": {"batch": [2.30, 2.31, 2.33], "syncbatch": [2.30, 2.3005, 2.2995],
                         "ghostbatch": [2.33, 2.33, 2.33], "layer": [2.25, 2.25, 2.25]},
            "stats_error": {"batch": [0.05, 0.07, 0.10], "syncbatch": [0.05, 0.05, 0.051],
                            "ghostbatch": [0.1, 0.1, 0.1], "layer": [None, None, None]}}


def _landscape() -> dict:
    def curve(model, norm, variation, change, beta):
        return {"model": model, "norm": norm, "loss_variation": variation, "gradient_change": change,
                "beta_smoothness": beta}

    return {"curves": [  # the medians decide: BatchNorm's lesson variation is larger at one of three snapshots
        curve("lesson", "batch", [0.5, 0.9, 0.4], [0.3, 0.2, 0.2], [1.0, 0.8, 0.9]),
        curve("lesson", "none", [0.6, 0.7, 0.8], [0.5, 0.6, 0.7], [1.5, 1.6, 1.7]),
        curve("deep", "batch", [0.2, 0.3, 0.3], [0.4, 0.5, 0.5], [2.0, 2.1, 2.2]),
        curve("deep", "none", [0.9, 0.8, 0.9], [1.5, 1.4, 1.6], [2.5, 2.4, 2.6])]}


def _recipe_differences() -> dict:
    # Seeds spread as mean + (-0.01, 0, 0.01, 0): the recipe's seed std (both sets) 0.00816, so the noise threshold
    # is 3 x 0.00816 x √(2/4) = 0.0173. Every factor moves the mean by 0.03 or more at one level; fresh seeds 0.005.
    means = {"lesson-kaiming": 2.31, "other seeds": 2.315, "cosine": 2.38, "constant": 2.31, "lr 0.05": 2.40,
             "lr 0.2": 2.29, "half the steps": 2.45, "double the steps": 2.26, "batch 16": 2.34, "batch 64": 2.31,
             "n_hidden 100": 2.37, "n_hidden 300": 2.30, "naive N(0,1)": 2.60, "x0.2 (tanh-fix)": 2.31}
    levels = [{"factor": level.factor, "label": level.label} for level in recipe_differences.LEVELS]
    assert [level["label"] for level in levels] == list(means)
    return {"levels": levels, "val_loss": {label: [mean - 0.01, mean, mean + 0.01, mean]
                                           for label, mean in means.items()}}


def _small_batch() -> dict:
    # Two seeds at mean ± 0.005: pooled std 0.00707, standard error of a difference of gaps 0.00707 x √(4/2) = 0.01.
    # Gaps: BatchNorm 0.30, Batch Renorm 0.14 (0.16 narrower > 3 x 0.01), per-example norms 0.11 (LayerNorm 0.10,
    # GroupNorm 0.12): BatchNorm's excess 0.19, of which Batch Renorm removes 0.16 >= half.
    means = {"batch": [2.60, 2.35, 2.30], "batchrenorm": [2.45, 2.36, 2.31], "layer": [2.42, 2.33, 2.32],
             "group": [2.44, 2.34, 2.32]}
    return {"batch_sizes": [2, 8, 32], "val_loss": {norm: [[m - 0.005, m + 0.005] for m in values]
                                                      for norm, values in means.items()}}


GOOD = {"depth": _depth, "init-schemes": _init_schemes, "saturation": _saturation,
        "init-sensitivity": _init_sensitivity, "learning-rate": _learning_rate, "train-vs-eval": _train_vs_eval,
        "momentum": _momentum, "affine": _affine, "temperature": _temperature, "softmax-init": _softmax_init,
        "seeds": _seeds, "batch-coupling": _batch_coupling, "data-parallel": _data_parallel, "landscape": _landscape,
        "recipe-differences": _recipe_differences, "small-batch": _small_batch}


def _set(path: str, value):
    """A change: set the item at `path` (keys and list indices separated by '/') to `value`."""
    def change(measurements: dict) -> None:
        *parents, last = [int(p) if p.lstrip("-").isdigit() else p for p in path.split("/")]
        target = measurements
        for key in parents:
            target = target[key]
        target[last] = value
    return change


BROKEN = [  # (experiment, the change, the check that must fail)
    ("depth", _set("curves/0/act_std/1", 0.1), "gain 0.5"),  # last/first 0.2: no longer vanishing
    ("depth", _set("curves/3/saturated/1", 0.1), "gain 3"),
    ("depth", _set("curves/2/act_std/1", 0.2), "gain 5/3"),  # last/first 0.29: not steady
    ("depth", _set("curves/7/grad_std/0", 0.0102), "changes nothing"),  # 2% apart from the other gains
    ("init-schemes", _set("curves/5/act_std/1", 0.3), "Kaiming: steady"),  # ReLU Kaiming 0.375: outside [0.5, 2]
    ("init-schemes", _set("curves/1/act_std/1", 0.7), "shrinks more"),
    ("init-schemes", _set("curves/0/share/1", 0.4), "tanh saturates"),
    ("saturation", _set("at_init/tanh/1", 0.3), "grows with the weight scale"),  # 0.3 then 0.2: not monotone
    ("saturation", _set("training/1/diverged_at", 5), "many dead units"),  # the only damaged run diverged
    ("saturation", _set("training/0/share/1", 0.1), "few dead units"),
    ("init-sensitivity", _set("runs/3/val_loss", 2.6), "much smaller"),  # spread 0.3 vs 0.5: not below half
    ("init-sensitivity", _set("runs/3/val_loss", None), "much smaller"),  # a diverged BatchNorm run: infinite
    ("learning-rate", _set("runs/5/val_loss", 2.5), "largest good rate"),  # BatchNorm at 1: 0.2 from its best
    ("learning-rate", _set("runs/6/val_loss", 3.4), "largest stable rate"),  # BatchNorm at 3 above uniform
    ("train-vs-eval", _set("max_abs_difference/train", 5e-5), "train mode"),
    ("train-vs-eval", _set("max_abs_difference/eval", 1e-5), "eval mode"),
    ("train-vs-eval", _set("val_loss_calibrated", 2.32), "calibrated"),
    ("momentum", _set("tracking_error/0/0", 0.025), "is slow"),  # 1.25x the best: not worse enough
    ("momentum", _set("tracking_error/6/1", 0.006), "is noisy"),
    ("affine", _set("identity_error", 1e-6), "identity"),
    ("affine", _set("val_loss/plain", [2.31, 2.30, 2.33]), "beyond the noise"),  # -0.0033 ± 0.0067
    ("temperature", _set("rows/2/mean_entropy", 1.5), "entropy rises"),  # flat between 0.7 and 1.0
    ("temperature", _set("rows/4/share_unique", 0.97), "does not fall"),  # falls by 0.02
    ("softmax-init", _set("initial_loss/naive/0", 6.0), "confidently wrong"),  # below 2 x 3.2958
    ("softmax-init", _set("initial_loss/scaled/1", 3.45), "starts at"),
    ("seeds", _set("val_loss/none", [2.20, 2.31, 2.42]), "more than the noise"),  # gap 0.1 < 2 x std 0.11
    ("seeds", _set("val_loss/layer", [2.35, 2.35, 2.35]), "differ across seeds"),
    ("seeds", _set("val_loss/none/0", None), "more than the noise"),  # a diverged run: no finite comparison
    ("batch-coupling", _set("val_loss/rms/0", 3.1), "than rms"),  # RMSNorm degrades by 0.7 > 0.6
    ("data-parallel", _set("val_loss/batch/2", 2.304), "val loss rises"),  # +0.004 at 4 ranks: within 0.005
    ("data-parallel", _set("stats_error/batch/2", 0.07), "error grows"),  # 1.4x
    ("data-parallel", _set("val_loss/syncbatch/1", 2.305), "val loss stays"),  # 0.005 from one process
    ("data-parallel", _set("stats_error/syncbatch/2", 0.06), "error stays"),  # 1.2x
    ("landscape", _set("curves/1/beta_smoothness", [0.9, 0.7, 0.8]), "lesson: effective β-smoothness"),
    ("landscape", _set("curves/2/loss_variation", [0.2, 1.0, 1.0]), "deep: loss variation"),  # median 1.0 > 0.9
    ("landscape", _set("curves/2/gradient_change", [0.4, None, None]), "deep: gradient"),  # NaN probes count as Inf
    ("recipe-differences", _set("val_loss/other seeds", [2.32, 2.33, 2.34, 2.33]), "fresh set of seeds"),  # +0.02
    ("recipe-differences", _set("val_loss/other seeds/0", None), "fresh set of seeds"),  # a diverged run
    ("recipe-differences", _set("val_loss/batch 16", [2.31, 2.32, 2.33, 2.32]), "batch size"),  # +0.01 < 0.0173
    # noisier fresh seeds (same mean): seed std 0.0183, threshold 3 x 0.0183 x √(2/4) = 0.039 > batch 16's +0.03
    ("recipe-differences", _set("val_loss/other seeds", [2.285, 2.315, 2.345, 2.315]), "batch size"),
    # noisy seeds at batch 8 (pooled std 0.041): 3 standard errors 0.18 > the narrowing 0.16
    ("small-batch", _set("val_loss/batch/1", [2.25, 2.45]), "beyond seed noise"),
    ("small-batch", _set("val_loss/batchrenorm/0", [2.525, 2.535]), "at least 50%"),  # narrows by 0.08 < 0.095
]


@pytest.mark.parametrize("name", list(GOOD))
def test_each_rule_holds_on_numbers_that_satisfy_it(name):
    assert set(GOOD) == set(EXPERIMENTS)
    verdict = EXPERIMENTS[name].check(GOOD[name]())
    assert verdict.text == HOLDS, verdict.checks


@pytest.mark.parametrize(("name", "change", "failing"), BROKEN)
def test_each_rule_sees_a_failing_case(name, change, failing):
    measurements = copy.deepcopy(GOOD[name]())
    change(measurements)
    verdict = EXPERIMENTS[name].check(measurements)
    assert verdict.text == DOES_NOT_HOLD
    assert [check.name for check in verdict.checks if not check.passed] == [
        check.name for check in verdict.checks if failing in check.name]


def test_an_unstable_level_does_not_widen_the_seed_noise_of_recipe_differences():
    measurements = _recipe_differences()
    measurements["val_loss"]["naive N(0,1)"] = [2.3, 2.9, 2.3, 2.9]  # std 0.35: pooled with the rest, it would
    verdict = EXPERIMENTS["recipe-differences"].check(measurements)  # hide batch 16's +0.03
    assert verdict.text == HOLDS, verdict.checks
