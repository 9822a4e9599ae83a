"""The commands as library calls: which engine trains, what it records, and that state needs no detours."""

from __future__ import annotations

import csv

import pytest
from conftest import TINY_SETTINGS

from normlab.config import config_for_preset
from normlab.model import LanguageModel
from normlab.runs.commands import start_training


def _config(words_file, *extra):
    config = config_for_preset("lesson-batchnorm", [*TINY_SETTINGS, *extra])
    config.data.path = str(words_file)
    return config


@pytest.mark.parametrize("preset, engine", [("lesson-batchnorm", "stacked"), ("lesson-deep", "reference")])
def test_diagnose_records_every_statistic_on_the_engine_the_config_chooses(tmp_path, words_file, preset, engine):
    config = config_for_preset(preset, [*TINY_SETTINGS, "n_layers=2" if preset == "lesson-deep" else "n_layers=1"])
    config.data.path = str(words_file)
    outcome = start_training(config, tmp_path / "run", diagnose=True, every=20, progress=False)
    assert outcome.engine == engine and outcome.report.is_file()
    with open(tmp_path / "run" / "diagnostics" / "scalars.csv") as file:
        rows = list(csv.DictReader(file))
    assert {int(row["step"]) for row in rows} == set(range(0, 120, 20))
    assert {"act_std", "grad_std", "grad_to_data", "update_to_data"} <= {row["metric"] for row in rows}


def test_checkpoints_of_the_stacked_engine_build_no_modules(tmp_path, words_file, monkeypatch):
    built = []
    original = LanguageModel.__init__

    def counting(self, *args, **kwargs):
        built.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(LanguageModel, "__init__", counting)
    counts = []
    for every in ("120", "10"):  # one checkpoint, then twelve
        built.clear()
        start_training(_config(words_file, f"checkpoint_every={every}"), tmp_path / every, progress=False)
        counts.append(len(built))
    assert counts[0] == counts[1] == 2  # the initial draw, and the module the final losses are measured on
