"""The `best` preset (issue 15): it validates, builds, runs on the stacked engine, and trains end to end.

Its quality (val loss ≤ 1.95 on the lesson's file in ≤ 10 minutes) is measured by benchmarks/best_preset.py, not
here: these tests use the bundled names and two steps.
"""

from __future__ import annotations

import json
import math

from normlab.config import PRESETS, config_for_preset
from normlab.model import build_model
from normlab.training.engines import choose_engine


def test_best_preset_validates_and_builds():
    config = config_for_preset("best")
    assert config.model.architecture == "wavenet" and config.model.norm == "batch"
    assert config.train.optimizer == "adamw" and config.train.schedule == "cosine"
    model = build_model(config.model, vocab_size=27, seed=config.train.seed)
    assert sum(p.numel() for p in model.parameters()) > 100_000
    assert choose_engine(config.model, config.train) == "stacked"  # the fast engine, not the reference path
    assert "val" in PRESETS["best"].description  # the description states its measured val loss


def test_best_preset_trains_two_steps_on_the_bundled_names(tmp_path, capsys):
    from normlab.cli import main

    out = tmp_path / "run"
    assert main(["train", "--preset", "best", "--out", str(out), "--quiet", "--set", "train.steps=2",
                 "--set", "train.eval_examples=500"]) == 0
    assert "final loss" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = rows[-1]
    assert final["event"] == "final" and final["step"] == 2
    assert all(math.isfinite(final[split]) and final[split] < 3.5 for split in ("train", "val", "test"))
    assert json.loads((out / "config.json").read_text())["preset"] == "best"
